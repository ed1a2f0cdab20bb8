"""Per-token deviation between freshly computed and cached K or V: CacheBlend's selection signal."""
from __future__ import annotations

import torch

from kvblend.kernels.dispatch import choose


def kv_deviation_torch(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    diff = fresh.float() - cached.float()
    return diff.square().sum(dim=(0, 2))


def kv_deviation(fresh: torch.Tensor, cached: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Squared L2 distance per token over heads and head dims: [KV, T, D] x2 → [T] float32."""
    if fresh.shape != cached.shape:
        raise ValueError(f"fresh {tuple(fresh.shape)} and cached {tuple(cached.shape)} differ in shape")
    if choose("kv_deviation", backend, fresh, cached) == "triton":
        from kvblend.kernels.triton_deviation import kv_deviation_triton

        return kv_deviation_triton(fresh, cached)
    return kv_deviation_torch(fresh, cached)
