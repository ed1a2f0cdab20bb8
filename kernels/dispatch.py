"""Backend choice shared by every kernel: Triton on CUDA tensors, torch elsewhere."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether an op runs its Triton kernel; "triton" on CPU needs TRITON_INTERPRET=1."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'kvblend[triton]')")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
    return True
