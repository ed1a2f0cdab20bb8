"""Write-behind for slow tiers: precompute hands objects over and goes on; nothing is lost.

Objects wait in `pending` (visible to get/contains) until every target tier has them. `flush()`
waits for the queue to drain; the store calls it on close and at interpreter exit. A tier whose
write fails is counted (and logged on its first failure since its last success); the others still
get the object. Once every tier has been tried, `on_written(key, failures)` says how it went, so a
caller records a chunk as stored only after it is. If more than `max_pending_bytes` wait, `submit`
blocks, so memory stays bounded when disks are slow.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from kvblend.store.base import ChunkKV
from kvblend.store.stats import TierStats

log = logging.getLogger(__name__)
WriteListener = Callable[[str, dict[str, str]], None]  # (key, {tier name: why its write failed}); {} = every tier has it


class WritableTier(Protocol):
    name: str
    stats: TierStats

    def put(self, key: str, kv: ChunkKV) -> None: ...


class WriteBehind:
    def __init__(self, max_pending_bytes: int = 2**30, on_written: WriteListener | None = None):
        self.max_pending_bytes = max_pending_bytes
        self.on_written = on_written
        self._failing: set[str] = set()  # tiers whose last write failed: their next failures are not logged again
        self._queue: queue.Queue[tuple[str, ChunkKV, list[WritableTier]] | None] = queue.Queue()
        self._pending: dict[str, ChunkKV] = {}
        self._pending_bytes = 0
        self._room = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, key: str, kv: ChunkKV, tiers: list[WritableTier]) -> None:
        if not tiers:
            return
        with self._room:
            while self._pending_bytes > self.max_pending_bytes:
                self._room.wait()
            self._pending[key] = kv
            self._pending_bytes += kv.nbytes
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kvblend-write-behind", daemon=True)
                self._thread.start()
        self._queue.put((key, kv, tiers))

    def pending(self, key: str) -> ChunkKV | None:
        return self._pending.get(key)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            key, kv, tiers = item
            failures = write_each(key, kv, tiers, self._failing)
            if self.on_written is not None:
                try:
                    self.on_written(key, failures)
                except Exception:  # a listener's bug must not stop the writes
                    log.exception("write listener failed for %s", key)
            with self._room:
                if self._pending.get(key) is kv:
                    del self._pending[key]
                self._pending_bytes -= kv.nbytes
                self._room.notify_all()
            self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        """Return once every submitted object is in its tiers."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        self.flush()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def write_each(key: str, kv: ChunkKV, tiers: list[WritableTier], failing: set[str]) -> dict[str, str]:
    """Put kv in every tier; returns {tier name: error} for those that failed (the others still get it)."""
    failures = {}
    for tier in tiers:
        try:
            tier.put(key, kv)
        except Exception as exc:  # a cache tier failing must not lose the other tiers' copy
            failures[tier.name] = str(exc) or type(exc).__name__
            tier.stats.add(errors=1)
            if tier.name not in failing and not getattr(exc, "logged", False):  # a tier may have said so itself
                log.warning("write of %s to the %s tier failed: %s", key, tier.name, exc)
            failing.add(tier.name)
        else:
            failing.discard(tier.name)
    return failures
