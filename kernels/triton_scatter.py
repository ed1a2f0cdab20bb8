"""Triton row scatter of recomputed K/V: into the contiguous fused buffer [KV, N, D] by row index,
and into a paged cache through a slot mapping in vLLM's CUDA layout
([num_blocks, block_size, kv_heads, head_dim] per K and V; slot -1 is padding and is skipped).

Every address comes from the tensors' strides, so views (one half of a stacked [2, ...] cache,
transposed projections) are written in place without copies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32  # rows per program; the grid's second axis is the KV head


@triton.jit
def _scatter_rows_kernel(
    src_ptr, dst_ptr, rows_ptr,
    n_rows,
    ss_h, ss_t, ss_d,
    sd_h, sd_t, sd_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < n_rows
    mask = t_ok[:, None] & (d < HEAD_DIM)[None, :]
    row = tl.load(rows_ptr + t, mask=t_ok, other=0)
    x = tl.load(src_ptr + h * ss_h + t[:, None] * ss_t + d[None, :] * ss_d, mask=mask)
    tl.store(dst_ptr + h * sd_h + row[:, None] * sd_t + d[None, :] * sd_d, x.to(dst_ptr.dtype.element_ty), mask=mask)


def scatter_rows_triton(src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Triton twin of `scatter_rows_torch`: dst[:, rows] = src; returns dst."""
    kv_heads, n_rows, dim = src.shape
    if n_rows == 0:
        return dst
    _scatter_rows_kernel[(triton.cdiv(n_rows, BLOCK_ROWS), kv_heads)](
        src, dst, rows, n_rows, *src.stride(), *dst.stride(),
        HEAD_DIM=dim, BLOCK_T=BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(dim), num_warps=4,
    )
    return dst


@triton.jit
def _scatter_rows_paged_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    n_rows, block_size,
    sk_t, sk_h, sk_d,
    sv_t, sv_h, sv_d,
    skc_b, skc_o, skc_h, skc_d,
    svc_b, svc_o, svc_h, svc_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slots_ptr + t, mask=t < n_rows, other=-1).to(tl.int64)
    mask = (slot >= 0)[:, None] & (d < HEAD_DIM)[None, :]
    block, offset = slot // block_size, slot % block_size
    k = tl.load(k_ptr + t[:, None] * sk_t + h * sk_h + d[None, :] * sk_d, mask=mask)
    v = tl.load(v_ptr + t[:, None] * sv_t + h * sv_h + d[None, :] * sv_d, mask=mask)
    k_dst = k_cache_ptr + block[:, None] * skc_b + offset[:, None] * skc_o + h * skc_h + d[None, :] * skc_d
    v_dst = v_cache_ptr + block[:, None] * svc_b + offset[:, None] * svc_o + h * svc_h + d[None, :] * svc_d
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def scatter_rows_paged_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `scatter_rows_paged_torch`: k, v [S, KV, D] into caches at flat slots [S]."""
    n_rows, kv_heads, dim = k.shape
    if n_rows == 0:
        return k_cache, v_cache
    _scatter_rows_paged_kernel[(triton.cdiv(n_rows, BLOCK_ROWS), kv_heads)](
        k, v, k_cache, v_cache, slot_mapping, n_rows, k_cache.shape[1],
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        HEAD_DIM=dim, BLOCK_T=BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(dim), num_warps=4,
    )
    return k_cache, v_cache
