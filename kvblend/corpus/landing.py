"""Which of a run's chunks reached the store: a chunk counts as stored once every durable tier has it.

A tiered store writes its disk and remote tiers in the background and tells its write listeners
how each write went; `Landing` collects those reports, so precompute records a chunk (manifest,
index, its "encoded" count) only after its object is on disk / on the server, never before, and
knows which chunks failed and why. A chunk found already stored that this run itself wrote waits
for (and shares) that write's outcome: memory tiers hold it even when the disk refused it.
"""
from __future__ import annotations

import queue
from collections import defaultdict
from contextlib import ExitStack
from typing import Generic, TypeVar

T = TypeVar("T")


class Landing(Generic[T]):
    """Items waiting on the store writes of their keys; `ready()` hands back those whose write finished."""

    def __init__(self, store):
        self.store = store
        # stores outside kvblend, or with no disk/remote tier, finish a put before it returns
        self.tracks = hasattr(store, "write_listener") and bool(getattr(store, "durable", False))
        self._events: queue.SimpleQueue[tuple[str, dict[str, str]]] = queue.SimpleQueue()
        self._outcome: dict[str, dict[str, str] | None] = {}  # key written this run → None in flight, else failures
        self._waiting: dict[str, list[T]] = defaultdict(list)
        self._done: list[tuple[T, dict[str, str]]] = []
        self._stack = ExitStack()

    def __enter__(self) -> "Landing[T]":
        if self.tracks:
            self._stack.enter_context(self.store.write_listener(lambda key, failures: self._events.put((key, failures))))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def wrote(self, key: str, item: T) -> None:
        """This run put `key` in the store for `item`."""
        if not self.tracks:
            self._done.append((item, {}))
            return
        self._outcome[key] = None
        self._waiting[key].append(item)

    def found(self, key: str, item: T) -> None:
        """`item`'s key was already in the store: stored now, unless this run's own write of it is pending or failed."""
        outcome = self._outcome.get(key, {})
        if outcome is None:
            self._waiting[key].append(item)
        else:
            self._done.append((item, outcome))

    def ready(self) -> list[tuple[T, dict[str, str]]]:
        """Items whose writes have finished since the last call, with {tier: error} for the tiers that failed."""
        while True:
            try:
                key, failures = self._events.get_nowait()
            except queue.Empty:
                break
            if key in self._waiting:  # other keys: promotions between tiers, not this run's puts
                self._outcome[key] = dict(failures)
                self._done.extend((item, dict(failures)) for item in self._waiting.pop(key))
        done, self._done = self._done, []
        return done

    def finish(self) -> list[tuple[T, dict[str, str]]]:
        """Wait for every write still in flight; the items not yet handed back."""
        flush = getattr(self.store, "flush", None)
        if flush is not None:
            flush()
        return self.ready()

    @property
    def in_flight(self) -> int:
        return sum(len(items) for items in self._waiting.values())
