"""How one layer's K/V become bytes in a serialized tier: raw, or quantized per token.

A layer blob is the concatenation of the codec's parts. Quantized codecs keep one float32
scale per (head, token) — the row's max magnitude over head_dim mapped to the code's range —
so an outlier token does not flatten its neighbours. The codec is named in each object's
header; a reader decodes whatever codec it finds, whatever its own store writes.
"""
from __future__ import annotations

import math

import torch

from kvblend.store.base import ChunkKV

Shape = tuple[int, int, int]  # (kv_heads, tokens, head_dim)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as flat uint8 (no copy)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


class RawCodec:
    """The model's dtype, bit for bit: [K | V]."""

    name = "raw"

    def layer_nbytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return 2 * math.prod(shape) * dtype.itemsize

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [as_bytes(k.cpu()), as_bytes(v.cpu())]

    def decode(self, blob: torch.Tensor, shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        half = blob.numel() // 2
        return blob[:half].view(dtype).view(shape), blob[half:].view(dtype).view(shape)


class PerTokenCodec:
    """Per-(head, token) scaled codes: [K codes | K scales | V codes | V scales]."""

    def __init__(self, name: str, code_dtype: torch.dtype, code_max: float):
        self.name, self.code_dtype, self.code_max = name, code_dtype, code_max

    def layer_nbytes(self, shape: Shape, dtype: torch.dtype) -> int:
        heads, tokens, dim = shape
        return 2 * (heads * tokens * dim * self.code_dtype.itemsize + heads * tokens * 4)

    def _quantize(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.detach().to("cpu", torch.float32)
        scale = (x.abs().amax(dim=-1, keepdim=True) / self.code_max).clamp_min(1e-12)
        y = x / scale
        codes = y.round().clamp(-self.code_max, self.code_max).to(self.code_dtype) if not self.code_dtype.is_floating_point else y.to(self.code_dtype)
        return [as_bytes(codes), as_bytes(scale.squeeze(-1))]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return self._quantize(k) + self._quantize(v)

    def _dequantize(self, part: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        heads, tokens, dim = shape
        n_codes = heads * tokens * dim * self.code_dtype.itemsize
        codes = part[:n_codes].view(self.code_dtype).view(shape)
        scale = part[n_codes:].view(torch.float32).view(heads, tokens, 1)
        return (codes.to(torch.float32) * scale).to(dtype)

    def decode(self, blob: torch.Tensor, shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        half = blob.numel() // 2
        return self._dequantize(blob[:half], shape, dtype), self._dequantize(blob[half:], shape, dtype)


CODECS = {
    "raw": RawCodec(),
    "fp8": PerTokenCodec("fp8", torch.float8_e4m3fn, 448.0),
    "int8": PerTokenCodec("int8", torch.int8, 127.0),
}


def get_codec(name: str) -> RawCodec | PerTokenCodec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}") from None


def roundtrip(kv: ChunkKV, codec_name: str) -> ChunkKV:
    """kv as a reader of `codec_name` objects would see it: memory tiers then serve the same values."""
    if codec_name == "raw":
        return kv
    codec = get_codec(codec_name)
    layers = [codec.decode(torch.cat(codec.encode(*kv.layer(i))), kv.layer_shape, kv.dtype) for i in range(kv.num_layers)]
    keys = torch.stack([k for k, _ in layers]).to(kv.keys.device)
    values = torch.stack([v for _, v in layers]).to(kv.values.device)
    return ChunkKV(kv.key, kv.fingerprint, keys, values)
