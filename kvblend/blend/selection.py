"""Which cached tokens a check layer keeps for recompute.

CacheBlend ranks cached tokens by how far their fresh KV strays from the cached KV. Refinements
live here too, all spending the same budget: attention sinks (the first tokens of each chunk,
which a standalone encoding over-attends), query-aware ranking (the attention the question pays
each token at the check layer, or over every layer of a look-ahead on the reused KV) and
per-chunk budgets (each chunk recomputes its own share).
"""
from __future__ import annotations

import math

import torch

from kvblend.config import BlendConfig


def budget(ratio: float, n_cached: int) -> int:
    """Cached tokens kept at this ratio: ceil(r·N_cached)."""
    return min(n_cached, math.ceil(ratio * n_cached - 1e-9))


def query_attention(q_question: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention probability the question's queries [H, Tq, D] pay each key [KV, N, D] → [N]."""
    heads, tq, d = q_question.shape
    kv_heads, n = keys.shape[0], keys.shape[1]
    q = q_question.float().reshape(kv_heads, heads // kv_heads * tq, d)  # a KV head's query heads side by side
    scores = torch.bmm(q, keys.float().transpose(1, 2)).mul_(scale).view(kv_heads, heads // kv_heads, tq, n)
    visible = torch.arange(n, device=keys.device)[None, :] <= q_pos[:, None]
    scores.masked_fill_(~visible, float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(0, 1, 2))


def rank_scores(cfg: BlendConfig, deviation: torch.Tensor, attention: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Higher = recompute first."""
    if cfg.selection == "random":
        return torch.rand(deviation.shape, generator=generator)
    if cfg.selection in ("query", "lookahead") and attention is not None and cfg.query_weight > 0:
        d = deviation / deviation.mean().clamp_min(1e-12)
        a = attention / attention.mean().clamp_min(1e-12)
        return d * a.pow(cfg.query_weight)
    return deviation


def keep_top(scores: torch.Tensor, forced: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k best scores, forced indices first (they count in the k)."""
    scores = scores.clone()
    scores[forced] = float("inf")
    k = min(k, scores.numel())
    return torch.topk(scores, k, sorted=False).indices.sort().values


def keep_top_per_group(scores: torch.Tensor, forced: torch.Tensor, groups: torch.Tensor, quota: list[int]) -> torch.Tensor:
    """Sorted indices of each group g's quota[g] best scores (forced ones first, counted in)."""
    kept = [members[keep_top(scores[members], forced[members], quota[int(g)])]
            for g in groups.unique() for members in [(groups == g).nonzero().squeeze(1)]]
    return torch.cat(kept).sort().values if kept else torch.zeros(0, dtype=torch.long)
