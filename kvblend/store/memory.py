"""The simplest store: a dict in process memory (no cap, no persistence)."""
from __future__ import annotations

from kvblend.store.base import ChunkKV


class MemoryStore:
    def __init__(self) -> None:
        self._items: dict[str, ChunkKV] = {}

    def get(self, key: str) -> ChunkKV | None:
        return self._items.get(key)

    def put(self, key: str, kv: ChunkKV) -> None:
        self._items[key] = kv

    def contains(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
