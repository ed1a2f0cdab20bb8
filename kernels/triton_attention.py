"""Triton attention of selected queries over the fused cache, flash-style (online softmax).

A query at absolute position p sees the keys at positions <= p. One program owns a block of
BLOCK_Q consecutive selected queries and one KV head, and stacks the GROUP query heads that share
that head into its rows (GQA folding): K/V tiles are loaded once per group, and the tile stays
GROUP_PAD·BLOCK_Q ≈ 128 rows tall whatever the GQA ratio. Queries are sorted, so the keys up to
the block's first position are visible to every row and run without a mask; only the keys between
its first and last position pay for the position mask.

Scores and the softmax are fp32. On a GPU fp16/bf16 tiles feed tensor cores (fp32 accumulation),
fp32 inputs use IEEE fp32 products like torch; under TRITON_INTERPRET=1, whose bf16 arithmetic is
wrong, every tile is cast to fp32 first.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kvblend.kernels.triton_reduce import row_max, row_sum

ROWS_PER_PROGRAM = 128  # folded query rows (heads × queries) per program
BLOCK_KEYS = 64


@triton.jit
def _attend_keys(
    acc, l_i, m_i, q, q_pos,
    k_base, v_base, sk_n, sk_d, sv_n, sv_d,
    lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys lo..hi-1 into the running (acc, l_i, m_i); MASKED applies key <= query position."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        tile_ok = d_ok[None, :]
        if MASKED:
            tile_ok = tile_ok & (keys < hi)[:, None]
        k = tl.load(k_base + keys[:, None] * sk_n + d[None, :] * sk_d, mask=tile_ok, other=0.0)
        v = tl.load(v_base + keys[:, None] * sv_n + d[None, :] * sv_d, mask=tile_ok, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
        if MASKED:
            scores = tl.where(keys[None, :] <= q_pos[:, None], scores, float("-inf"))
        m_new = tl.maximum(m_i, row_max(scores))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + row_sum(p)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _selected_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr,
    n_queries, qk_scale,
    sq_h, sq_s, sq_d,
    sk_h, sk_n, sk_d,
    sv_h, sv_n, sv_d,
    so_h, so_s, so_d,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    first_query = tl.program_id(0) * BLOCK_Q
    kv_head = tl.program_id(1)
    rows = tl.arange(0, GROUP_PAD * BLOCK_Q)
    head = kv_head * GROUP + rows // BLOCK_Q
    query = first_query + rows % BLOCK_Q
    row_ok = (rows // BLOCK_Q < GROUP) & (query < n_queries)
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + head[:, None] * sq_h + query[:, None] * sq_s + d[None, :] * sq_d, mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(pos_ptr + query, mask=query < n_queries, other=0)  # padding rows see key 0: no NaN
    lo_pos = tl.load(pos_ptr + first_query)
    hi_pos = tl.load(pos_ptr + tl.minimum(first_query + BLOCK_Q, n_queries) - 1)

    m_i = tl.full((GROUP_PAD * BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.full((GROUP_PAD * BLOCK_Q,), 0.0, tl.float32)
    acc = tl.full((GROUP_PAD * BLOCK_Q, BLOCK_D), 0.0, tl.float32)
    k_base, v_base = k_ptr + kv_head * sk_h, v_ptr + kv_head * sv_h
    shared_end = (lo_pos + 1) // BLOCK_N * BLOCK_N  # whole tiles every row of the block sees
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, k_base, v_base, sk_n, sk_d, sv_n, sv_d, 0, shared_end, qk_scale,
                                 HEAD_DIM, BLOCK_N, BLOCK_D, False, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, k_base, v_base, sk_n, sk_d, sv_n, sv_d, shared_end, hi_pos + 1, qk_scale,
                                 HEAD_DIM, BLOCK_N, BLOCK_D, True, UPCAST, DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + head[:, None] * so_h + query[:, None] * so_s + d[None, :] * so_d,
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def selected_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """Triton twin of `selected_attention_torch`: q [H, S, D] at sorted q_pos [S] over k, v [KV, N, D]."""
    heads, n_queries, dim = q.shape
    kv_heads = k.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if n_queries == 0:
        return out
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = min(max(ROWS_PER_PROGRAM // group_pad, 1), triton.next_power_of_2(n_queries))  # 1 query: 1 slot
    block_q = max(block_q, -(-16 // group_pad))  # tl.dot needs >= 16 rows
    block_d = max(triton.next_power_of_2(dim), 16)
    upcast = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(n_queries, block_q), kv_heads)
    _selected_attention_kernel[grid](
        q, k, v, q_pos, out, n_queries, scale * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=BLOCK_KEYS, HEAD_DIM=dim, BLOCK_D=block_d,
        # fp32 tiles need IEEE products to match torch (16-bit tiles ignore the setting)
        UPCAST=upcast, DOT_PRECISION="ieee" if upcast or q.dtype == torch.float32 else "tf32",
        num_warps=8 if group_pad * block_q * block_d >= 128 * 128 else 4, num_stages=3,
    )
    return out
