"""Triton row scatter of recomputed K/V into the contiguous fused buffer [KV, N, D] by row index.

Every address comes from the tensors' strides, so views (transposed projections, a layer
of a larger buffer) are written in place without copies.
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
