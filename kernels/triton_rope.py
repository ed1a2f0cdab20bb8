"""Triton RoPE realignment: rotate position-free keys to their absolute positions and write them
straight into the fused buffer's rows, so a chunk's keys cross memory once (read, rotate, store).

Rotate-half layout: each output pair (a, b) = (i, i + D/2) is
    out[a] = x[a]·cos[a] − x[b]·sin[a]        out[b] = x[b]·cos[b] + x[a]·sin[b]
Math is fp32 whatever the storage dtype (the interpreter's bf16 arithmetic is wrong anyway).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvblend.kernels.rope_table import check_rope_table

BLOCK_TOKENS = 32  # tokens per program; each program walks every KV head, loading cos/sin once


@triton.jit
def _rope_realign_kernel(
    keys_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr,
    n_tokens, kv_heads,
    sk_h, sk_t, sk_d,
    sc_p, sc_d,
    ss_p, ss_d,
    so_h, so_t, so_d,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    SCATTER: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    t_ok = t < n_tokens
    mask = t_ok[:, None] & (i < HALF)[None, :]
    pos = tl.load(pos_ptr + t, mask=t_ok, other=0)
    a, b = i, i + HALF
    row_c, row_s = pos[:, None] * sc_p, pos[:, None] * ss_p
    cos_a = tl.load(cos_ptr + row_c + a[None, :] * sc_d, mask=mask).to(tl.float32)
    cos_b = tl.load(cos_ptr + row_c + b[None, :] * sc_d, mask=mask).to(tl.float32)
    sin_a = tl.load(sin_ptr + row_s + a[None, :] * ss_d, mask=mask).to(tl.float32)
    sin_b = tl.load(sin_ptr + row_s + b[None, :] * ss_d, mask=mask).to(tl.float32)
    out_row = pos if SCATTER else t
    for h in range(kv_heads):
        src = keys_ptr + h * sk_h + t[:, None] * sk_t
        x_a = tl.load(src + a[None, :] * sk_d, mask=mask).to(tl.float32)
        x_b = tl.load(src + b[None, :] * sk_d, mask=mask).to(tl.float32)
        dst = out_ptr + h * so_h + out_row[:, None] * so_t
        tl.store(dst + a[None, :] * so_d, (x_a * cos_a - x_b * sin_a).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + b[None, :] * so_d, (x_b * cos_b + x_a * sin_b).to(out_ptr.dtype.element_ty), mask=mask)


def rope_realign_triton(
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of `rope_realign_torch`: keys [KV, L, D] → out[:, positions] (or a new [KV, L, D])."""
    check_rope_table(keys, cos, sin)  # the kernel reads table columns up to the keys' head dim
    kv_heads, n_tokens, dim = keys.shape
    scatter = out is not None
    if out is None:
        out = torch.empty(keys.shape, dtype=torch.promote_types(keys.dtype, cos.dtype), device=keys.device)
    if n_tokens == 0:
        return out
    half = dim // 2
    grid = (triton.cdiv(n_tokens, BLOCK_TOKENS),)
    _rope_realign_kernel[grid](
        keys, cos, sin, positions, out,
        n_tokens, kv_heads,
        *keys.stride(), *cos.stride(), *sin.stride(), *out.stride(),
        HALF=half, BLOCK_T=BLOCK_TOKENS, BLOCK_HALF=triton.next_power_of_2(half),
        SCATTER=scatter, num_warps=4,
    )
    return out
