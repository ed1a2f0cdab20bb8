"""A memory tier: chunk KV in process memory (CPU, pinned CPU or GPU), LRU under a byte cap."""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from kvblend.store.base import ChunkKV
from kvblend.store.stats import TierStats


class MemoryStore:
    """Holds ChunkKV objects; `max_bytes=None` never evicts. Thread-safe (the prefetcher promotes)."""

    def __init__(self, max_bytes: int | None = None, device: str | torch.device = "cpu", pin: bool = False, name: str = "cpu"):
        self.max_bytes, self.device, self.pin, self.name = max_bytes, torch.device(device), pin, name
        self.stats = TierStats()
        self._items: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            kv = self._items.get(key)
            if kv is not None:
                self._items.move_to_end(key)
            return kv

    def _resident(self, kv: ChunkKV) -> ChunkKV:
        """kv with its tensors on this tier's device (pinned if asked); the same object when already there."""
        if kv.keys.device == self.device and (not self.pin or kv.keys.is_pinned()):
            return kv
        keys, values = kv.keys.to(self.device), kv.values.to(self.device)
        if self.pin:
            keys, values = keys.pin_memory(), values.pin_memory()
        return ChunkKV(kv.key, kv.fingerprint, keys, values)

    def put(self, key: str, kv: ChunkKV) -> None:
        if self.max_bytes is not None and kv.nbytes > self.max_bytes:
            return  # larger than the whole tier: lower tiers keep it
        kv = self._resident(kv)
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= old.nbytes if old is not None else 0
            while self.max_bytes is not None and self._items and self._bytes + kv.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats.add(evictions=1)
            self._items[key] = kv
            self._bytes += kv.nbytes
        self.stats.add(writes=1, bytes_written=kv.nbytes)

    def contains(self, key: str) -> bool:
        return key in self._items

    def discard(self, key: str, reason: str = "") -> None:
        with self._lock:
            kv = self._items.pop(key, None)
            self._bytes -= kv.nbytes if kv is not None else 0

    def __len__(self) -> int:
        return len(self._items)

    def summary(self) -> dict:
        return {"objects": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes}
