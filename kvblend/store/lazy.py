"""A stored chunk read one layer at a time: fetched, verified and decoded on first use.

`LazyChunk` has ChunkKV's read-only face (key, fingerprint, num_layers, num_tokens, layer_shape,
dtype, layer(i)), so the executor takes it as a span's KV. Layers load in order, from any thread
(the prefetcher reads ahead; `layer(i)` loads what is still missing). A layer that fails its
checksum or cannot be read turns the chunk into a recompute: the consumer-supplied `recompute`
rebuilds the KV, so a damaged object costs time, never correctness.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from kvblend.store.base import ChunkKV
from kvblend.store.codecs import get_codec
from kvblend.store.format import CorruptObject, ObjectHeader, layer_hasher
from kvblend.store.stats import TierStats

log = logging.getLogger(__name__)


class ObjectReader(Protocol):
    """Positioned reads of one stored object (a file descriptor, a Redis key). A reader whose
    `can_map` is true also has `mapped(offset, nbytes) -> memoryview` and `will_need(offset,
    nbytes)` (the disk tier's): raw objects are then served from a map of the file, not copies."""

    def read_into(self, offset: int, out: memoryview, landed: Callable[[memoryview], None]) -> None:
        """Fill `out` from `offset`, calling landed(piece) on each piece, in order, once it is in `out`."""

    def close(self) -> None: ...


class LazyChunk:
    def __init__(self, header: ObjectHeader, reader: ObjectReader, stats: TierStats, tier: str,
                 discard: Callable[[str, str], None], pin: bool = False):
        self.header, self.tier, self.stats, self._discard = header, tier, stats, discard
        self.recompute: Callable[[], ChunkKV] | None = None  # set by the consumer
        self.on_complete: Callable[[ChunkKV, bool], None] | None = None  # set by the store: (kv, was_recomputed)
        self.on_progress: Callable[[int], None] | None = None  # set by a prefetcher: layer the consumer reached
        self._reader: ObjectReader | None = reader
        self._codec = get_codec(header.codec)
        self._lock = threading.Lock()
        self._loaded = 0
        self._failure: str | None = None
        self._fallback: ChunkKV | None = None
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = {}
        self._staging = threading.Lock()  # guards _staged: the prefetch thread fills it, the consumer drains it
        self._pin = pin
        self._data: torch.Tensor | None = None  # allocated on the first load: a lookup alone costs no memory
        self._mapped = False

    def _allocate(self) -> None:
        n, lb, shape, dtype = self.num_layers, self.header.layer_nbytes, self.layer_shape, self.dtype
        mapped = self.header.codec == "raw" and not self._pin and getattr(self._reader, "can_map", False)
        if mapped:  # raw bytes straight from the page cache: the checksum pass is the whole read
            self._bytes = self._reader.mapped(self.header.layer_offset(0), n * lb)
            self._data = torch.frombuffer(self._bytes, dtype=torch.uint8)
        else:
            self._data = torch.empty(n * lb, dtype=torch.uint8, pin_memory=self._pin)
            self._bytes = memoryview(self._data.numpy())  # layer reads slice this: no tensor op per layer
        self._mapped = mapped
        if self.header.codec == "raw":  # the blobs are [K | V] per layer: keys and values are views of the bytes
            halves = self._data.view(n, 2, lb // 2)
            self._keys = halves[:, 0].view(dtype).view(n, *shape)
            self._values = halves[:, 1].view(dtype).view(n, *shape)
        else:
            self._keys = torch.empty((n, *shape), dtype=dtype, pin_memory=self._pin)
            self._values = torch.empty((n, *shape), dtype=dtype, pin_memory=self._pin)

    key = property(lambda self: self.header.key)
    fingerprint = property(lambda self: self.header.fingerprint)
    num_layers = property(lambda self: self.header.num_layers)
    num_tokens = property(lambda self: self.header.tokens)
    layer_shape = property(lambda self: self.header.layer_shape)
    dtype = property(lambda self: self.header.torch_dtype)
    nbytes = property(lambda self: self.header.num_layers * self.header.layer_nbytes)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def load_through(self, i: int) -> None:
        """Make layers 0..i resident (no-op for those already loaded, or once the object failed)."""
        completed = False
        with self._lock:
            if self._data is None and self._failure is None:
                try:
                    self._allocate()
                except CorruptObject as exc:
                    self._fail(str(exc), corrupt=True)
                except OSError as exc:
                    self._fail(f"object {self.key} in the {self.tier} tier: cannot map it ({exc})", corrupt=False)
            while self._loaded <= i and self._failure is None:
                try:
                    self._load(self._loaded)
                except CorruptObject as exc:
                    self._fail(str(exc), corrupt=True)
                except Exception as exc:  # I/O error, remote gone: same outcome as a damaged layer
                    self._fail(f"object {self.key} in the {self.tier} tier: read failed ({exc})", corrupt=False)
                else:
                    self._loaded += 1
                    completed = self._loaded == self.num_layers
            if completed or self._failure is not None:
                self._release()
        if completed and self.on_complete:  # tiers above keep memory of their own, not a map of a file
            keys, values = (self._keys.clone(), self._values.clone()) if self._mapped else (self._keys, self._values)
            self.on_complete(ChunkKV(self.key, self.fingerprint, keys, values), False)

    def _load(self, i: int) -> None:
        lb = self.header.layer_nbytes
        blob = self._bytes[i * lb : (i + 1) * lb]
        t0 = time.perf_counter()
        hasher = layer_hasher()
        if self._mapped:
            self._reader.will_need(self.header.layer_offset(i), lb)
            hasher.update(blob)
        else:
            self._reader.read_into(self.header.layer_offset(i), blob, hasher.update)
        self.header.verify_digest(i, hasher.intdigest())
        if self.header.codec != "raw":
            k, v = self._codec.decode(self._data[i * lb : (i + 1) * lb], self.layer_shape, self.dtype)
            self._keys[i].copy_(k)
            self._values[i].copy_(v)
        self.stats.add(bytes_read=lb, read_s=time.perf_counter() - t0)

    def _fail(self, reason: str, corrupt: bool) -> None:
        self._failure = reason
        self.stats.add(**({"corrupt": 1} if corrupt else {"errors": 1}))
        if corrupt:
            self._discard(self.key, reason)
        log.warning("%s: recomputing the chunk", reason)

    def _release(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def stage(self, i: int, device: torch.device, stream: torch.cuda.Stream) -> None:
        """Copy loaded layer i to `device` on a side CUDA stream (pipelined host→device)."""
        with self._staging:
            if self._failure is not None or i >= self._loaded or i in self._staged:
                return
        with torch.cuda.stream(stream):
            k = self._keys[i].to(device, non_blocking=True)
            v = self._values[i].to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        with self._staging:
            self._staged[i] = (k, v, done)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer i, each [kv_heads, tokens, head_dim]."""
        if self.on_progress:
            self.on_progress(i)
        with self._staging:
            staged = self._staged.pop(i, None)
            for j in [j for j in self._staged if j < i]:  # layers the consumer skipped
                del self._staged[j]
        if staged is not None and self._failure is None:
            k, v, done = staged
            current = torch.cuda.current_stream(k.device)
            current.wait_event(done)
            k.record_stream(current)
            v.record_stream(current)
            return k, v
        self.load_through(i)
        if self._failure is None:
            return self._keys[i], self._values[i]
        return self._recomputed().layer(i)

    def _recomputed(self) -> ChunkKV:
        if self._fallback is None:
            if self.recompute is None:
                raise CorruptObject(f"{self._failure}, and no way to recompute it was given")
            self._fallback = self.recompute()
            if self.on_complete:
                self.on_complete(self._fallback, True)
        return self._fallback

    keys = property(lambda self: self.materialize().keys, doc="all layers' keys (loads them all)")
    values = property(lambda self: self.materialize().values, doc="all layers' values (loads them all)")

    def materialize(self) -> ChunkKV:
        """All layers as one ChunkKV (raises CorruptObject if the object is bad and cannot be recomputed)."""
        self.load_through(self.num_layers - 1)
        if self._failure is not None:
            return self._recomputed()
        return ChunkKV(self.key, self.fingerprint, self._keys, self._values)
