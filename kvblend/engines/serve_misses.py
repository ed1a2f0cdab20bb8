"""`kvblend serve`'s background work, kept behind the requests it serves.

Requests' planning and background encoding share the tokenizer and the model, so one lock guards
them. `BlendLock` gives requests priority: background work takes the lock only while no request is
waiting for it, and a request waits at most for the background step in progress. While requests
are in flight (arrived, not yet answered: vLLM decodes them on the same cores), background steps
are also deferred, by up to `defer_s` each, so they slow answers down as little as they can
without starving. `MissEncoder` encodes the chunks requests missed, one chunk per step on a thread
of its own, from a bounded queue: when it is full, further misses are
dropped (the next request that misses them queues them again), so a burst of new chunks can
neither hold up later requests nor grow memory without bound.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kvblend.engines.vllm import land_writes

log = logging.getLogger(__name__)


class BlendLock:
    """A lock whose urgent holders (requests) go before background ones."""

    def __init__(self, defer_s: float = 2.0):
        self.defer_s = defer_s
        self._cond = threading.Condition()
        self._held = False
        self._urgent_waiting = 0
        self._in_flight = 0

    def arrive(self) -> None:
        """A request arrived: background steps wait (up to defer_s each) until it has been answered."""
        with self._cond:
            self._in_flight += 1

    def leave(self) -> None:
        """The request that arrived has been answered (or failed)."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def acquire(self, urgent: bool) -> float:
        """Take the lock; returns the seconds spent waiting for it."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.defer_s
        with self._cond:
            if urgent:
                self._urgent_waiting += 1
            try:
                while True:
                    deferring = not urgent and self._in_flight and time.monotonic() < deadline
                    if not (self._held or (not urgent and self._urgent_waiting) or deferring):
                        break
                    self._cond.wait(timeout=max(0.0, deadline - time.monotonic()) if deferring else None)
                self._held = True
            finally:
                if urgent:
                    self._urgent_waiting -= 1
        return time.perf_counter() - t0

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @contextmanager
    def held(self, urgent: bool) -> Iterator[float]:
        """with lock.held(urgent=True) as waited: ...; `waited` is the wait in seconds."""
        waited = self.acquire(urgent)
        try:
            yield waited
        finally:
            self.release()


class MissEncoder:
    """Encodes missed chunks into kb's store in the background, one chunk per turn of the lock."""

    def __init__(self, kb, lock: BlendLock, max_queued: int = 1024):
        self.kb, self.lock = kb, lock
        self._queue: queue.Queue[str] = queue.Queue(max_queued)
        self._queued: set[str] = set()
        self._guard = threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="kvblend-encode-misses", daemon=True)
        self._thread.start()

    def submit(self, chunks: list[str]) -> None:
        """Queue chunks to encode (those queued already are not queued twice); returns at once."""
        for text in chunks:
            with self._guard:
                if text in self._queued:
                    continue
                try:
                    self._queue.put_nowait(text)
                except queue.Full:
                    self.dropped += 1
                    if self.dropped == 1 or self.dropped % 1000 == 0:
                        log.warning("%d missed chunks not queued for encoding (the queue of %d is full): later requests "
                                    "that miss them queue them again", self.dropped, self._queue.maxsize)
                    continue
                self._queued.add(text)

    def pending(self) -> int:
        """Chunks queued or being encoded."""
        with self._guard:
            return len(self._queued)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty (for tests and shutdown); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _run(self) -> None:
        while True:
            text = self._queue.get()
            try:
                with self.lock.held(urgent=False):
                    self.kb.precompute([text])  # a chunk stored meanwhile is looked up, not encoded again
                land_writes(self.kb.store)  # on disk (or in Redis) before a plan counts it: vLLM's worker reads it there
            except Exception:  # one bad chunk must not end the worker
                log.exception("encoding a missed chunk failed")
            finally:
                with self._guard:
                    self._queued.discard(text)
