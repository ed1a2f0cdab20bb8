"""RMSNorm and SiLU(gate)·up, the element-wise steps around a decoder layer's GEMMs.

Each is a torch reference (the arithmetic of transformers' Llama-family modules) plus, on CPU in
fp32, a one-pass C++ kernel (cpu_norm_act.cpp): torch runs them as 6 and 3 separate passes with
their temporaries. Neither has a Triton kernel (kvblend.kernels.dispatch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvblend.kernels import cpu_library
from kvblend.kernels.dispatch import choose


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / sqrt(mean(x²) + eps) over the last dim, in fp32, back to x's dtype before the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x [..., dim] with weight [dim]."""
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"RMSNorm weight of shape {tuple(weight.shape)} for inputs of shape {tuple(x.shape)}")
    if choose("rms_norm", backend, x, weight) == "torch":
        return rms_norm_torch(x, weight, eps)
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    cpu_library.require().kvblend_rms_norm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // max(dim, 1),
                                               dim, eps, torch.get_num_threads())
    return out


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SiLU(gate) · up for gate_up [..., 2·inter] holding the two halves side by side → [..., inter]."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate/up rows of odd width {gate_up.shape[-1]}")
    if choose("silu_mul", backend, gate_up) == "torch":
        return silu_mul_torch(gate_up)
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], inter))
    cpu_library.require().kvblend_silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // max(2 * inter, 1),
                                               inter, torch.get_num_threads())
    return out
