"""Model weights in transparent huge pages (CPU).

A blend reads every weight once per request for a few hundred rows, so its GEMMs stream weights
from memory and take a TLB miss per 4 KB page. Where paging is virtualized twice (the microVMs
kvblend is measured on) a miss is dear, and memory left alone for a moment is dearer at its next
touch; 2 MB pages take 512 times fewer misses (docs/benchmarks.md has the figures). Linux backs
anonymous memory advised MADV_HUGEPAGE with 2 MB pages when transparent_hugepage is `madvise` or
`always`; with `never`, or off Linux, the arena is ordinary memory and nothing changes.
"""
from __future__ import annotations

import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ADVISABLE = hasattr(mmap, "MADV_HUGEPAGE")  # Linux: elsewhere an arena would only be a copy
ALIGN = 64  # each tensor starts on a cache line


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class HugePageArena:
    """One block of anonymous memory advised for huge pages, handed out as tensors in order."""

    def __init__(self, nbytes: int):
        self._map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if ADVISABLE:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)  # keeps the map alive as long as any view
        start = -raw.data_ptr() % HUGE_PAGE  # huge pages cover 2 MB-aligned ranges only
        self._bytes = raw[start : start + nbytes]
        self._used = 0

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if self._used + nbytes > self._bytes.numel():
            raise MemoryError(f"huge-page arena of {self._bytes.numel()} bytes is full ({nbytes} more asked)")
        out = self._bytes[self._used : self._used + nbytes].view(dtype).view(shape)
        self._used += _aligned(nbytes)
        return out

    def holds(self, t: torch.Tensor) -> bool:
        base = self._bytes.data_ptr()
        return base <= t.data_ptr() < base + self._bytes.numel()

    def adopt(self, model: nn.Module) -> None:
        """Move every parameter not yet in the arena into it (tied parameters stay tied)."""
        moved: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or self.holds(p):
                    continue
                if id(p) not in moved:
                    data = self.empty(p.shape, p.dtype)
                    data.copy_(p.data)
                    moved[id(p)] = nn.Parameter(data, requires_grad=False)
                module._parameters[name] = moved[id(p)]

    @staticmethod
    def size_for(model: nn.Module) -> int:
        """Bytes for all of the model's parameters, each cache-line aligned (fusing them only needs less)."""
        return sum(_aligned(p.nbytes) for p in model.parameters())
