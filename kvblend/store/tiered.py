"""The tiered store: GPU → CPU → disk → remote behind one `KVStore`.

A lookup walks the tiers fastest first; a hit in a lower tier is promoted into the tiers above it
(memory tiers at once, or — for a lazily read object — as soon as all its layers are in).
A put goes to the memory tiers at once and through to the serialized tiers on a background
writer, so precompute never waits on a disk or a network; pending writes are visible to
get/contains and are flushed on close and at interpreter exit. Write listeners learn when each
write to the serialized tiers has finished and which tiers failed it: a caller that must not
claim a chunk is stored (precompute's manifest) waits for that, not for `put` to return.
"""
from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kvblend.store.base import ChunkKV
from kvblend.store.codecs import roundtrip
from kvblend.store.controller import LoadingController
from kvblend.store.disk import DiskStore
from kvblend.store.lazy import LazyChunk
from kvblend.store.memory import MemoryStore
from kvblend.store.stats import TierStats, merge_into
from kvblend.store.writer import WriteBehind, WriteListener, write_each

if TYPE_CHECKING:
    from kvblend.store.remote import RedisStore

log = logging.getLogger(__name__)
_open_stores: "weakref.WeakSet[TieredStore]" = weakref.WeakSet()


class TieredStore:
    def __init__(self, memory: list[MemoryStore], serialized: list[DiskStore | RedisStore], codec: str = "raw",
                 async_writes: bool = True, controller: LoadingController | None = None):
        self.memory, self.serialized = memory, serialized
        self.tiers: list[MemoryStore | DiskStore | RedisStore] = [*memory, *serialized]
        self.codec = codec
        self.controller = controller or LoadingController()
        self.rejected = TierStats()  # objects the consumer refused (foreign model, wrong shape)
        self._listeners: list[WriteListener] = []
        self._failing: set[str] = set()
        self._writer = WriteBehind(on_written=self._written) if async_writes else None
        self._closed = False
        _open_stores.add(self)

    # -- KVStore ----------------------------------------------------------------------------------
    def get(self, key: str) -> ChunkKV | LazyChunk | None:
        if self._writer and (kv := self._writer.pending(key)) is not None:
            return kv
        for i, tier in enumerate(self.tiers):
            found = tier.get(key)
            if found is None:
                tier.stats.add(misses=1)
                continue
            tier.stats.add(hits=1)
            self._promote(key, found, self.tiers[:i])
            return found
        return None

    def put(self, key: str, kv: ChunkKV) -> None:
        """Store everywhere: memory tiers now, serialized tiers in the background (or now, if not async)."""
        if self._closed:
            raise RuntimeError("put on a closed store")
        self._store_in(key, roundtrip(kv, self.codec), self.tiers)

    def contains(self, key: str) -> bool:
        if self._writer and self._writer.pending(key) is not None:
            return True
        return any(tier.contains(key) for tier in self.tiers)

    def discard(self, key: str, reason: str = "") -> None:
        """The consumer found this key's object unusable: forget it in every tier."""
        self.rejected.add(corrupt=1)
        for tier in self.tiers:
            tier.discard(key, reason)

    # -- promotion and write-through --------------------------------------------------------------
    def _promote(self, key: str, found: ChunkKV | LazyChunk, upper: list) -> None:
        """Copy a hit into the tiers above its own; a lazily read one also heals its tiers if recomputed."""
        if not isinstance(found, LazyChunk):
            if upper:
                self._store_in(key, found, upper)
            return

        def complete(kv: ChunkKV, recomputed: bool) -> None:
            if recomputed:
                self.put(key, kv)  # heal every tier with the recomputed object
            else:
                self._store_in(key, kv, upper)

        found.on_complete = complete

    def _store_in(self, key: str, kv: ChunkKV, tiers: list) -> None:
        if not tiers:
            return
        slow = [t for t in tiers if not isinstance(t, MemoryStore)]
        for tier in tiers:
            if isinstance(tier, MemoryStore):
                tier.put(key, kv)
        if not slow:
            return
        if self._writer:
            self._writer.submit(key, kv, slow)
        else:
            self._written(key, write_each(key, kv, slow, self._failing))

    # -- write listeners --------------------------------------------------------------------------
    @property
    def durable(self) -> bool:
        """Whether anything put here outlives this process (a disk or remote tier)."""
        return bool(self.serialized)

    @contextmanager
    def write_listener(self, listener: WriteListener) -> Iterator[None]:
        """Call listener(key, failures) as each write to the serialized tiers finishes (on the writer's
        thread when writes are asynchronous); failures maps tier name → error, empty when all have it."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def _written(self, key: str, failures: dict[str, str]) -> None:
        for listener in list(self._listeners):
            listener(key, failures)

    # -- lifecycle and reporting ------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every accepted write is in its tiers."""
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        """Flush pending writes and add this process's counters to the disk tier's running stats."""
        if self._closed:
            return
        self._closed = True
        if self._writer:
            self._writer.close()
        for tier in self.serialized:
            if isinstance(tier, DiskStore):
                merge_into(tier.root, {t.name: t.stats.as_dict() for t in self.tiers})

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Per-tier counters (hits, misses, corrupt, errors, evictions, bandwidth) and the controller's choices."""
        out = {tier.name: tier.stats.as_dict() for tier in self.tiers}
        out["rejected"] = self.rejected.corrupt
        out["controller"] = self.controller.summary()
        return out

    def describe(self) -> str:
        return " → ".join(tier.name for tier in self.tiers) + f" (codec {self.codec})"


@atexit.register
def _close_open_stores() -> None:
    for store in list(_open_stores):
        try:
            store.close()
        except Exception as exc:  # exit must go on; say what was not written
            log.warning("closing a KV store at exit failed: %s", exc)
