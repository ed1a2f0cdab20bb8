"""Rotary tables as kvblend's kernels take them, shared by the model adapters.

`kvblend.kernels.rotate` takes cos/sin [T, head_dim] with the two halves duplicated (transformers'
`rotate_half` layout, vLLM's `is_neox_style`): x·cos + rotate_half(x)·sin.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

ROPE_TABLE_ROWS = 4096  # positions in the first table of a static rope type

TableBuilder = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


class RopeTables:
    """cos, sin [end - start, head_dim] for positions start..end-1, sliced from one table that
    `build(0, rows)` makes (at least ROPE_TABLE_ROWS rows) and rebuilt longer when a longer one is
    asked for. For rope types whose frequencies do not depend on the call."""

    def __init__(self, build: TableBuilder):
        self._build = build
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, end: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None or self._table[0].shape[0] < end:
            self._table = self._build(0, max(end, ROPE_TABLE_ROWS))
        cos, sin = self._table
        return cos[start:end], sin[start:end]


def duplicate_halves(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables of one value per frequency ([T, head_dim / 2], as vLLM's `cos_sin_cache` holds them)
    widened to the duplicated-halves layout [T, head_dim]."""
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
