"""Attention of selected queries (any positions) over the fused cache, exact causal mask by
absolute position: a query at position p sees the keys at positions <= p. GQA included.

On CPU in fp32, `backend="auto"` runs the C++ kernel (cpu_attention.cpp) when it builds. The
torch path (the reference, and the fallback) folds the query heads that share a KV head into the
query-length dimension, so K/V are never repeated, and walks the (sorted) queries in blocks, each
attending only to the keys up to its last position. Masks depend on positions alone, so an
`AttentionPlan` is built once per selection and shared by every layer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvblend.kernels import cpu_attention
from kvblend.kernels.dispatch import choose


@dataclass
class AttentionPlan:
    """Query positions, plus the per-block additive masks (0 / -inf) the torch path needs, built
    on first use (the C++ and Triton kernels take the positions alone)."""

    q_pos: torch.Tensor
    n_keys: int
    full_causal: bool
    group: int = 1
    block: int = 128
    dtype: torch.dtype = torch.float32

    @functools.cached_property
    def blocks(self) -> list[tuple[int, int, int, torch.Tensor]]:
        """(first query, end query, keys seen, mask [group * queries, keys]) per block of <= `block` queries.

        Masks are additive in the queries' dtype (SDPA's CPU kernel adds them faster than it applies
        boolean ones), and they are built once for every layer."""
        key_pos = torch.arange(self.n_keys, device=self.q_pos.device)
        pos = self.q_pos.tolist()
        blocks = []
        for start in range(0, len(pos), self.block):
            end = min(start + self.block, len(pos))
            kv_len = pos[end - 1] + 1
            hidden = key_pos[None, :kv_len] > self.q_pos[start:end, None]
            mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.q_pos.device).masked_fill_(hidden, float("-inf"))
            blocks.append((start, end, kv_len, mask.repeat(self.group, 1)))
        return blocks


def plan_attention(
    q_pos: torch.Tensor, n_keys: int, group: int, block: int = 128, dtype: torch.dtype = torch.float32
) -> AttentionPlan:
    """The plan for queries at q_pos (strictly increasing) over n_keys keys, shared by every layer."""
    if q_pos.numel() and (q_pos.diff() <= 0).any():
        raise ValueError("query positions must be strictly increasing")
    if q_pos.numel() and int(q_pos[-1]) >= n_keys:
        raise ValueError(f"query position {int(q_pos[-1])} is past the {n_keys} keys")
    return AttentionPlan(q_pos, n_keys, q_pos.numel() == n_keys, group, block, dtype)


def selected_attention_torch(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    heads, s, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    if plan.full_causal:
        out = F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=group > 1
        )
        return out[0]
    out = torch.empty_like(q)
    folded = q.view(kv_heads, group, s, d)
    for start, end, kv_len, mask in plan.blocks:
        qb = folded[:, :, start:end].reshape(kv_heads, group * (end - start), d)
        mask = mask.to(q.dtype)  # a no-op when the plan was built for q's dtype
        ob = F.scaled_dot_product_attention(qb[None], k[None, :, :kv_len], v[None, :, :kv_len], attn_mask=mask, scale=scale)
        out.view(kv_heads, group, s, d)[:, :, start:end] = ob[0].view(kv_heads, group, end - start, d)
    return out


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """q [H, S, D] (rotated) at plan.q_pos over k, v [KV, N, D] → [H, S, D] in q's dtype."""
    if q.shape[1] != plan.q_pos.shape[0]:
        raise ValueError(f"{q.shape[1]} queries but {plan.q_pos.shape[0]} positions")
    if q.shape[0] % k.shape[0]:
        raise ValueError(f"{q.shape[0]} query heads are not a multiple of {k.shape[0]} KV heads")
    if q.shape[1] == 0:
        return q.clone()
    impl = choose("selected_attention", backend, q, k, v)
    if impl == "triton":
        from kvblend.kernels.triton_attention import selected_attention_triton

        return selected_attention_triton(q, k, v, plan.q_pos, scale)
    if impl == "cpp":
        return cpu_attention.selected_attention_cpu(q, k, v, plan, scale)
    return selected_attention_torch(q, k, v, plan, scale)
