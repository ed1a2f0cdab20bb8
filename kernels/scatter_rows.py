"""Write recomputed K/V rows into the fused contiguous buffer."""
from __future__ import annotations

import torch

from kvblend.kernels.dispatch import choose


def scatter_rows_torch(src, dst, rows):
    return dst.index_copy_(1, rows, src.to(dst.dtype))


def scatter_rows(src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """dst[:, rows] = src for src [KV, S, D] and dst [KV, N, D]; returns dst."""
    if src.shape[1] != rows.shape[0]:
        raise ValueError(f"{src.shape[1]} source rows but {rows.shape[0]} row indices")
    if choose("scatter_rows", backend, src, dst) == "triton":
        from kvblend.kernels.triton_scatter import scatter_rows_triton

        return scatter_rows_triton(src, dst, rows)
    return scatter_rows_torch(src, dst, rows)
