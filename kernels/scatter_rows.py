"""Write recomputed K/V rows into the fused contiguous buffer or into a paged cache."""
from __future__ import annotations

import torch

from kvblend.kernels.dispatch import use_triton


def scatter_rows_torch(src, dst, rows):
    return dst.index_copy_(1, rows, src.to(dst.dtype))


def scatter_rows(src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """dst[:, rows] = src for src [KV, S, D] and dst [KV, N, D]; returns dst."""
    if src.shape[1] != rows.shape[0]:
        raise ValueError(f"{src.shape[1]} source rows but {rows.shape[0]} row indices")
    if use_triton(backend, src, dst):
        from kvblend.kernels.triton_scatter import scatter_rows_triton

        return scatter_rows_triton(src, dst, rows)
    return scatter_rows_torch(src, dst, rows)


def scatter_rows_paged_torch(k, v, k_cache, v_cache, slot_mapping):
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block, offset = slots // k_cache.shape[1], slots % k_cache.shape[1]  # indexing, not view: caches may be strided
    k_cache[block, offset] = k[valid].to(k_cache.dtype)
    v_cache[block, offset] = v[valid].to(v_cache.dtype)
    return k_cache, v_cache


def scatter_rows_paged(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k, v [S, KV, D] into paged caches [blocks, block_size, KV, D] at flat slots [S].

    Slot -1 marks a padding row and is skipped, as in vLLM's slot mappings.
    """
    if k.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"{k.shape[0]} rows but {slot_mapping.shape[0]} slots")
    if use_triton(backend, k, k_cache):
        from kvblend.kernels.triton_scatter import scatter_rows_paged_triton

        return scatter_rows_paged_triton(k, v, k_cache, v_cache, slot_mapping)
    return scatter_rows_paged_torch(k, v, k_cache, v_cache, slot_mapping)
