"""Attention of selected queries (any positions) over the fused cache, exact causal mask by
absolute position: a query at position p sees the keys at positions <= p. GQA included.

The torch path folds the query heads that share a KV head into the query-length dimension, so
K/V are never repeated, and walks the (sorted) queries in blocks, each attending only to the keys
up to its last position. Masks depend on positions alone, so an `AttentionPlan` is built once per
selection and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvblend.kernels.dispatch import use_triton


@dataclass
class AttentionPlan:
    """Query positions plus the per-block additive masks (0 / -inf) of the torch path."""

    q_pos: torch.Tensor
    n_keys: int
    full_causal: bool
    blocks: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)


def plan_attention(
    q_pos: torch.Tensor, n_keys: int, group: int, block: int = 128, dtype: torch.dtype = torch.float32
) -> AttentionPlan:
    """Blocks of <= `block` queries in position order; each block's mask covers its key range.

    Masks are additive in the queries' dtype: SDPA's CPU kernel adds them ~10% faster than it
    applies boolean ones, and they are built once for every layer."""
    if q_pos.numel() and (q_pos.diff() <= 0).any():
        raise ValueError("query positions must be strictly increasing")
    if q_pos.numel() and int(q_pos[-1]) >= n_keys:
        raise ValueError(f"query position {int(q_pos[-1])} is past the {n_keys} keys")
    full = q_pos.numel() == n_keys
    plan = AttentionPlan(q_pos=q_pos, n_keys=n_keys, full_causal=full)
    if full:
        return plan
    key_pos = torch.arange(n_keys, device=q_pos.device)
    pos = q_pos.tolist()
    for start in range(0, len(pos), block):
        end = min(start + block, len(pos))
        kv_len = pos[end - 1] + 1
        hidden = key_pos[None, :kv_len] > q_pos[start:end, None]
        mask = torch.zeros(hidden.shape, dtype=dtype, device=q_pos.device).masked_fill_(hidden, float("-inf"))
        plan.blocks.append((start, end, kv_len, mask.repeat(group, 1)))
    return plan


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
    if use_triton(backend, q, k, v):
        from kvblend.kernels.triton_attention import selected_attention_triton

        return selected_attention_triton(q, k, v, plan.q_pos, scale)
    return selected_attention_torch(q, k, v, plan, scale)
