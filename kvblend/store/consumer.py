"""The two things a consumer of the store tells it: "this object is unusable", "this is how to rebuild it"."""
from __future__ import annotations

import logging
from collections.abc import Callable

from kvblend.store.base import ChunkKV, KVStore
from kvblend.store.lazy import LazyChunk

log = logging.getLogger(__name__)


def reject(store: KVStore, key: str, reason: str) -> None:
    """Log a cached object the consumer cannot use (foreign model, wrong shape): a counted miss."""
    log.warning("cached chunk %s unusable (%s): treated as a miss", key, reason)
    discard = getattr(store, "discard", None)  # stores outside kvblend may not have one
    if discard is not None:
        discard(key, reason)


def with_recompute(kv: ChunkKV | LazyChunk, recompute: Callable[[], ChunkKV]) -> ChunkKV | LazyChunk:
    """kv, able to rebuild itself if a lazily read layer turns out damaged."""
    if isinstance(kv, LazyChunk):
        kv.recompute = recompute
    return kv
