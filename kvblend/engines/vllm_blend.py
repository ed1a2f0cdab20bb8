"""The blend plan: what the process that accepts a request sends to vLLM's worker, and what the
worker does with it (docs/vllm.md, "The connector").

A plan travels in a request's `kv_transfer_params` under `PLAN`, as plain JSON data:

- `ids`: the prompt token ids it was planned for (it serves a request whose prompt starts with them);
- `spans`: each chunk's [start, length, key] in prompt order (`KVBlend.key_for` keys);
- `context_ids`: the chunk encoding, the ids every chunk was encoded after (`KVBlend.context_ids`);
- `question_start` and `blend` (the BlendConfig as a dict);
- `id`: a fresh id, whose `blend_salt` is the request's `cache_salt`.

The store is not in the plan: it is the server's, set in the connector's `kv_connector_extra_config`
(`connector_config(..., store=...)`), so a client that writes `kv_transfer_params` itself cannot
make the worker open a folder or Redis URL of its choosing.

In the worker, `WorkerBlender` opens that store on first use, looks the
chunks up (`kvblend.blend.lookup.cached_spans`: a missing, foreign or damaged chunk becomes fresh
text, as in `KVBlend.prefill`; a span whose key is not this model's key for its tokens too) and
runs `BlendExecutor` on `worker_model()`, vLLM's own modules and weights.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import torch

from kvblend.blend.chunks import chunk_key
from kvblend.blend.executor import BlendExecutor
from kvblend.blend.lookup import cached_spans
from kvblend.config import BlendConfig, StoreConfig
from kvblend.results import RequestStats
from kvblend.store import KVStore, choose_recompute_ratio, open_store

if TYPE_CHECKING:
    from kvblend.api import KVBlend
    from kvblend.blend.plan import Prompt

log = logging.getLogger(__name__)
PLAN = "kvblend_plan"  # the kv_transfer_params field that carries a request's blend plan
REPORT_PARAM = "kvblend_blend"  # a finished output's kv_transfer_params field: the in-worker blend's counts and times


def make_plan(kb: "KVBlend", prompt: "Prompt", config: BlendConfig) -> dict[str, Any]:
    """The plan of blending `prompt` (built by `kb.build_prompt`) with `config` in vLLM's worker."""
    spans = [[start, len(seg.ids), kb.key_for(seg.ids)] for seg, start in zip(prompt.segments, prompt.starts())
             if seg.chunk is not None]
    return {"id": uuid.uuid4().hex, "ids": list(prompt.ids), "spans": spans, "context_ids": list(kb.context_ids),
            "question_start": prompt.starts()[-1], "blend": config.model_dump(mode="json")}


def blend_salt(plan_id: str) -> str:
    """The `cache_salt` a request carrying plan `plan_id` is sent with.

    vLLM mixes a request's salt into its prefix-cache block hashes, so the blocks a blend filled
    (approximate KV) can only ever match a request with the same salt: never an exact request,
    never another blend. Prefix caching can then stay on for everything else."""
    return f"kvblend-blend-{plan_id}"


def plan_tokens(plan: object) -> list[int] | None:
    """The prompt ids a plan from a request body covers, or None if it is not a well-formed plan."""
    if not isinstance(plan, dict) or not isinstance(plan.get("id"), str):
        return None
    ids = plan.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
        return None
    return ids


class FusedKV:
    """A blend's fused KV: per layer (keys, values) [kv_heads, N, head_dim], keys rotated at absolute positions."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def layer(self, i: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens start..end-1 of layer i as vLLM's cache-write ops take them: [tokens, kv_heads, head_dim]."""
        return self.keys[i][:, start:end].transpose(0, 1), self.values[i][:, start:end].transpose(0, 1)


class WorkerBlender:
    """Runs plans in vLLM's worker on the model vLLM loaded (`worker_model()`), with the server's
    store (`store`: a StoreConfig as a dict, from the connector's extra config; None: no store)."""

    def __init__(self, store: dict[str, Any] | None):
        self._config = StoreConfig.model_validate(store) if store is not None else None
        self._store: KVStore | None = None
        self._executor: BlendExecutor | None = None

    def _opened(self) -> tuple[StoreConfig, KVStore]:
        if self._config is None:
            raise RuntimeError("a blend plan reached vLLM's worker, but kvblend's connector has no store: start vLLM "
                               "with kv_connector_extra_config from kvblend's connector_config(..., store=...)")
        if self._store is None:
            self._store = open_store(self._config)
        return self._config, self._store

    def fused_kv(self, plan: dict[str, Any]) -> tuple[FusedKV, RequestStats]:
        """Blend the plan's prompt: its fused KV (keys rotated at absolute positions) and the blend's
        counts and times (what `KVBlend.prefill` reports for a blend in this process)."""
        from kvblend.engines.vllm_plugin import worker_model

        t0 = time.perf_counter()
        store_config, store = self._opened()
        m = worker_model()
        if self._executor is None:
            self._executor = BlendExecutor(m)
        ids, context_ids = plan["ids"], plan["context_ids"]
        located, ours = [], []
        for start, length, key in plan["spans"]:
            chunk_ids = ids[start : start + length]
            ours.append(chunk_key(m.fingerprint, context_ids, chunk_ids, m.dtype) == key)
            if ours[-1]:
                located.append((start, chunk_ids, key))
            else:
                log.warning("plan %s: chunk %s is not this model's key for its tokens: computed as fresh text", plan["id"], key)
        spans, found_located = cached_spans(store, m, context_ids, located, store_config.prefetch_layers)
        hits = iter(found_located)
        found = [is_ours and next(hits) for is_ours in ours]  # a span whose key was not this model's: a miss
        tokens = torch.tensor(ids, device=m.device)
        config = choose_recompute_ratio(store, BlendConfig.model_validate(plan["blend"]), [s.kv for s in spans], len(ids), m)
        out = self._executor.run(tokens, spans, plan["question_start"], config)
        stats = RequestStats(method="reuse" if config.recompute_ratio == 0 else "blend", tokens_total=len(ids),
                             recompute_ratio=config.recompute_ratio)
        stats.count_blend(spans, found, out.selected.numel())
        stats.stages_s = dict(out.timings) | {"blend": time.perf_counter() - t0}
        return FusedKV(out.keys, out.values), stats

    def close(self) -> None:
        """Land the store's background writes and close it."""
        if self._store is not None:
            getattr(self._store, "close", lambda: None)()
            self._store = None

