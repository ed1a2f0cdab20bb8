"""Layer-wise pipelined loading: read layer l+1.. of every lazy chunk while layer l computes.

One background thread per request walks the layers in order, loading that layer of every lazy
chunk (disk reads and Redis GETRANGEs release the GIL), and on CUDA copies it to the device on a
side stream. It never runs more than `depth` layers ahead of the layer the executor last asked
for, so read-ahead memory stays bounded. It holds the chunks weakly: if the request is abandoned
(an exception in the blend), the chunks die and the thread ends.
"""
from __future__ import annotations

import threading
import weakref

import torch

from kvblend.store.lazy import LazyChunk

POLL_S = 0.5  # how often a waiting prefetcher checks that its request is still alive


class LayerPrefetcher:
    def __init__(self, chunks: list[LazyChunk], depth: int, device: torch.device):
        self.depth, self.device = depth, torch.device(device)
        self.num_layers = max(c.num_layers for c in chunks)
        self._chunks = [weakref.ref(c) for c in chunks]
        self._reached = -1  # the highest layer the executor has asked for
        self._cond = threading.Condition()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for c in chunks:
            c.on_progress = self._advance
        self._thread = threading.Thread(target=self._run, name="kvblend-prefetch", daemon=True)
        self._thread.start()

    def _advance(self, layer: int) -> None:
        with self._cond:
            if layer > self._reached:
                self._reached = layer
                self._cond.notify_all()

    def _run(self) -> None:
        for layer in range(self.num_layers):
            with self._cond:
                while layer > self._reached + self.depth:
                    self._cond.wait(POLL_S)
                    if all(ref() is None for ref in self._chunks):
                        return
            for ref in self._chunks:
                chunk = ref()
                if chunk is None or layer >= chunk.num_layers:
                    continue
                chunk.load_through(layer)
                if self._stream is not None:
                    chunk.stage(layer, self.device, self._stream)
                del chunk

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def start_prefetch(sources: list, depth: int, device: torch.device | str) -> LayerPrefetcher | None:
    """Read ahead the lazy chunks among `sources` (others are already in memory); None if nothing to do."""
    lazy = [s for s in sources if isinstance(s, LazyChunk)]
    if not lazy or depth <= 0:
        return None
    return LayerPrefetcher(lazy, depth, torch.device(device))
