"""Triton per-token KV deviation: sum over heads and head dims of (fresh − cached)², in fp32.

One program owns a block of tokens and walks the KV heads, so each token's sum stays in registers
(no atomics, deterministic order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvblend.kernels.triton_reduce import row_sum

BLOCK_TOKENS = 32


@triton.jit
def _kv_deviation_kernel(
    fresh_ptr, cached_ptr, out_ptr,
    n_tokens, kv_heads,
    sf_h, sf_t, sf_d,
    sc_h, sc_t, sc_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < n_tokens
    mask = t_ok[:, None] & (d < HEAD_DIM)[None, :]
    total = tl.full((BLOCK_T,), 0.0, tl.float32)
    for h in range(kv_heads):
        f = tl.load(fresh_ptr + h * sf_h + t[:, None] * sf_t + d[None, :] * sf_d, mask=mask, other=0.0)
        c = tl.load(cached_ptr + h * sc_h + t[:, None] * sc_t + d[None, :] * sc_d, mask=mask, other=0.0)
        diff = f.to(tl.float32) - c.to(tl.float32)
        total += row_sum(diff * diff)
    tl.store(out_ptr + t, total, mask=t_ok)


def kv_deviation_triton(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Triton twin of `kv_deviation_torch`: [KV, T, D] x2 → [T] float32."""
    kv_heads, n_tokens, dim = fresh.shape
    out = torch.empty(n_tokens, dtype=torch.float32, device=fresh.device)
    if n_tokens == 0:
        return out
    _kv_deviation_kernel[(triton.cdiv(n_tokens, BLOCK_TOKENS),)](
        fresh, cached, out, n_tokens, kv_heads, *fresh.stride(), *cached.stride(),
        HEAD_DIM=dim, BLOCK_T=BLOCK_TOKENS, BLOCK_D=triton.next_power_of_2(dim), num_warps=4,
    )
    return out
