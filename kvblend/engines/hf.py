"""transformers engine (the embedded default): the fused KV becomes a `DynamicCache` and the
model's own forward decodes from it, one token at a time, streaming."""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvblend.config import BlendConfig
from kvblend.engines.sampling import Sampling
from kvblend.results import PREFILL_METHODS, TokenEvent

if TYPE_CHECKING:
    from kvblend.api import KVBlend


def to_dynamic_cache(config, keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """Per-layer [KV, N, D] tensors (keys rotated at absolute positions) → DynamicCache.

    A plain layer takes the tensors as they are: its `update` would concatenate them onto an
    empty tensor, a copy of the whole prompt's KV. Other layer kinds
    (sliding window) keep their own bookkeeping through `update`."""
    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(zip(keys, values)):
        layer = cache.layers[i] if i < len(cache.layers) else None
        if type(layer) is DynamicLayer and not layer.is_initialized:
            layer.lazy_initialization(k[None], v[None])
            layer.keys, layer.values = k[None], v[None]
        else:
            cache.update(k[None], v[None], i)
    return cache


@torch.inference_mode()
def full_prefill(model, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Plain prefill with the model's own forward: (cache, last-token logits float32)."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1].float()


@torch.inference_mode()
def step_logits(model, cache: DynamicCache, tokens: list[int], start: int) -> torch.Tensor:
    """Feed tokens at positions start.. onto the cache; logits [len(tokens), vocab] float32."""
    ids = torch.tensor([tokens], device=model.device)
    pos = torch.arange(start, start + len(tokens), device=model.device)[None]
    return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits[0].float()


def decode(
    model,
    cache: DynamicCache,
    first_logits: torch.Tensor,
    n_prompt: int,
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: set[int],
) -> Iterator[int]:
    """Yield generated token ids; the first comes from the prefill's logits, the rest from the cache."""
    generator = torch.Generator().manual_seed(sampling.seed)
    logits, pos = first_logits, n_prompt
    for _ in range(max_new_tokens):
        token = sampling.pick(logits, generator)
        yield token
        if token in stop_ids:
            return
        logits = step_logits(model, cache, [token], pos)[-1]
        pos += 1


def truncate(cache: DynamicCache, n: int) -> None:
    """Drop cached tokens past the first n (undo decoding steps)."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


class HFEngine:
    """Decodes with the model's own forward, from the cache `KVBlend.prefill` made, one request at a time."""

    methods = PREFILL_METHODS

    def __init__(self, kb: "KVBlend"):
        self.kb = kb

    def run(self, requests: Sequence[tuple[list[str], str]], max_new_tokens: int, method: str, sampling: Sampling,
            config: BlendConfig | None, keep_prefill: bool = False) -> Iterator[TokenEvent]:
        for i, (chunks, question) in enumerate(requests):
            pre = self.kb.prefill(chunks, question, method, config)
            kept = pre if keep_prefill else None
            t1 = time.perf_counter()
            for token in decode(self.kb.model, pre.cache, pre.logits, pre.ids.numel(), max_new_tokens, sampling, self.kb.stop_ids):
                yield TokenEvent(i, pre.stats, [token], kept)
            pre.stats.decode_s = time.perf_counter() - t1

    def warm(self, texts: Iterable[str]) -> None:
        pass

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass
