"""Finding a prompt's chunks in the store: the one lookup both blend sites use (`KVBlend.prefill` in
the API process, the vLLM connector in vLLM's worker)."""
from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from kvblend.blend.chunks import encode_chunk
from kvblend.blend.executor import CachedSpan
from kvblend.store import ChunkKV, KVStore, reject, start_prefetch, with_recompute


def lookup_chunk(store: KVStore, adapter, key: str, n_tokens: int) -> ChunkKV | None:
    """A usable cache for this chunk, or None: foreign or misshapen objects are misses (and rejected)."""
    kv = store.get(key)
    m = adapter
    if kv is None:
        return None
    if kv.fingerprint != m.fingerprint:
        reject(store, key, f"made by model {kv.fingerprint}")
        return None
    if kv.num_layers != m.num_layers or kv.layer_shape != (m.num_kv_heads, n_tokens, m.head_dim) or kv.dtype != m.dtype:
        reject(store, key, f"{kv.num_layers} layers of {kv.layer_shape} {kv.dtype}")
        return None
    return kv


def cached_spans(store: KVStore, adapter, context_ids: list[int], chunks: Iterable[tuple[int, list[int], str]],
                 prefetch_layers: int) -> tuple[list[CachedSpan], list[bool]]:
    """The blend's spans for chunks given as (start, token ids, key), in prompt order, and per chunk
    whether the store had a usable cache (a miss has no span: its tokens are fresh text). Each span
    re-encodes its chunk if a lazily read layer turns out damaged; prefetch starts on the hits."""
    spans: list[CachedSpan] = []
    found: list[bool] = []
    for start, ids, key in chunks:
        kv = lookup_chunk(store, adapter, key, len(ids))
        found.append(kv is not None)
        if kv is not None:
            spans.append(CachedSpan(start, with_recompute(kv, partial(encode_chunk, adapter, context_ids, ids, kv.key))))
    start_prefetch([s.kv for s in spans], prefetch_layers, adapter.device)
    return spans, found
