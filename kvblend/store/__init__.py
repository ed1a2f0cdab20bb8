"""KV stores: the interface the blend uses and its implementations."""
from kvblend.store.base import ChunkKV, KVStore
from kvblend.store.memory import MemoryStore
from kvblend.store.simple import DirectoryStore


def open_store(spec: str | None) -> KVStore:
    """None → in-memory store; a path → that directory (kept in memory once read)."""
    return MemoryStore() if spec is None else DirectoryStore(spec)


__all__ = ["ChunkKV", "DirectoryStore", "KVStore", "MemoryStore", "open_store"]
