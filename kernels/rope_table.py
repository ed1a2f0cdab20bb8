"""The one check every RoPE path (torch and Triton) makes of its cos/sin tables."""
from __future__ import annotations

import torch


def check_rope_table(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Tables must rotate the whole head (kvblend has no partial rotary): a narrower one is refused,
    where the Triton kernel would read past its rows."""
    dim = x.shape[-1]
    if cos.shape[-1] != dim or sin.shape[-1] != dim or dim % 2:
        raise ValueError(f"rotary table of width {cos.shape[-1]} for head dim {dim}: "
                         "RoPE here rotates the whole (even) head dim")
