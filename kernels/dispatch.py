"""The one place that chooses, per op and call, which implementation runs: torch, C++ or Triton.

`backend` is "auto" (Triton on CUDA tensors, C++ on CPU fp32 tensors where the op has a C++
kernel and the library builds, torch otherwise), "torch" (the reference), or "triton" (the
op's Triton kernel, or an error naming the op when it has none or Triton cannot run here).
"""
from __future__ import annotations

import os
from typing import Literal

import torch

from kvblend.kernels import cpu_library

BACKENDS = ("auto", "torch", "triton")
Impl = Literal["torch", "cpp", "triton"]
KERNELS: dict[str, tuple[Impl, ...]] = {  # op: the implementations beside its torch reference
    "selected_attention": ("cpp", "triton"),
    "rope_realign": ("triton",),
    "scatter_rows": ("triton",),
    "kv_deviation": ("triton",),
    "rms_norm": ("cpp",),
    "silu_mul": ("cpp",),
}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose(op: str, backend: str, *tensors: torch.Tensor) -> Impl:
    """The implementation of `op` that runs on these tensors under `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    kernels = KERNELS[op]
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if "triton" not in kernels:
            raise ValueError(f"backend 'triton': {op} has no Triton kernel (it runs on 'auto' or 'torch')")
        _check_triton_runs(tensors)
        return "triton"
    if "triton" in kernels and all(t.is_cuda for t in tensors) and triton_available():
        return "triton"
    if "cpp" in kernels and cpu_library.supports(*tensors):
        return "cpp"
    return "torch"


def _check_triton_runs(tensors: tuple[torch.Tensor, ...]) -> None:
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'kvblend[triton]')")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
