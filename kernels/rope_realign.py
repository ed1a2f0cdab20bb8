"""RoPE realignment: rotate position-free (pre-RoPE) keys to their absolute positions and gather
them into the fused per-layer buffer, whose row index is the absolute position."""
from __future__ import annotations

import torch

from kvblend.kernels.dispatch import choose
from kvblend.kernels.rope_table import check_rope_table


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to x [..., T, D] with cos/sin [T, D] (HF's duplicated-halves tables)."""
    check_rope_table(x, cos, sin)
    out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=torch.result_type(x, cos), device=x.device)
    return rotate_into(x, cos, sin, out)


def rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`rotate` written into `out` in three passes and no temporaries (the textbook
    x·cos + rotate_half(x)·sin makes four); also how a chunk's contiguous rows go from the store
    straight into the fused buffer."""
    check_rope_table(x, cos, sin)
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def rope_realign_span(
    keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, out: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Rotate keys [KV, L, D] to the contiguous positions start..start+L-1 of `out`."""
    end = start + keys.shape[1]
    if keys.dtype != out.dtype or choose("rope_realign", backend, keys, cos, sin) == "triton":
        positions = torch.arange(start, end, device=keys.device)
        return rope_realign(keys, cos, sin, positions, out=out, backend=backend)
    rotate_into(keys, cos[start:end], sin[start:end], out[:, start:end])
    return out


def rope_realign_torch(keys, cos, sin, positions, out=None):
    rotated = rotate(keys, cos.index_select(0, positions), sin.index_select(0, positions))
    if out is None:
        return rotated
    return out.index_copy_(1, positions, rotated.to(out.dtype))


def rope_realign(
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate keys [KV, L, D] to `positions` [L]; write them into out[:, positions] if given.

    cos/sin are [P, D] tables from the model's rotary embedding (P > max position), so scaled
    RoPE variants come for free. Returns `out` (or the rotated keys when out is None).
    """
    if keys.shape[1] != positions.shape[0]:
        raise ValueError(f"{keys.shape[1]} key rows but {positions.shape[0]} positions")
    check_rope_table(keys, cos, sin)
    if choose("rope_realign", backend, keys, cos, sin) == "triton":
        from kvblend.kernels.triton_rope import rope_realign_triton

        return rope_realign_triton(keys, cos, sin, positions, out)
    return rope_realign_torch(keys, cos, sin, positions, out)
