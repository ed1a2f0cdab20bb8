"""How one layer's K/V become bytes in a serialized tier: raw, quantized per token, or 4-bit in groups.

A layer blob is the concatenation of the codec's parts. The 8-bit codecs keep one float32
scale per (head, token) — the row's max magnitude over head_dim mapped to the code's range —
so an outlier token does not flatten its neighbours; int4 keeps one float16 scale per group of
32 values within the row. Sizes and quality costs: docs/benchmarks.md (Codecs). Each object's
header names its codec: a tier opened from a StoreConfig serves only objects in the configured
codec (format.CodecMismatch says why); maintenance (ls, verify, recode) decodes any.
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


class GroupInt4Codec:
    """4-bit codes with one float16 scale per group of `group` values along head_dim:
    [K nibbles | K scales | V nibbles | V scales].

    Codes are round(x / scale) in [-7, 7] with scale = the group's max magnitude / 7, stored as
    code + 8, two per byte (even index in the low nibble). A group is smaller than a row so a few
    outlier channels (common in keys) coarsen 32 values, not the whole head. A head_dim that is not
    a multiple of `group` is padded with zeros to one. Scales are rounded to float16 before the
    codes are computed, so the codes fit the scales a reader will use.
    """

    name = "int4"

    def __init__(self, group: int = 32):
        if group % 2:
            raise ValueError(f"int4 groups hold pairs of nibbles: group {group} must be even")
        self.group = group

    def _groups(self, dim: int) -> int:
        return -(-dim // self.group)

    def layer_nbytes(self, shape: Shape, dtype: torch.dtype) -> int:
        heads, tokens, dim = shape
        groups = heads * tokens * self._groups(dim)
        return 2 * (groups * self.group // 2 + groups * 2)

    def _quantize(self, x: torch.Tensor) -> list[torch.Tensor]:
        heads, tokens, dim = x.shape
        groups = self._groups(dim)
        x = x.detach().to("cpu", torch.float32)
        if groups * self.group != dim:
            x = torch.nn.functional.pad(x, (0, groups * self.group - dim))
        x = x.reshape(heads, tokens, groups, self.group)
        scale = (x.abs().amax(dim=-1, keepdim=True) / 7.0).to(torch.float16)
        safe = scale.float().masked_fill(scale == 0, 1.0)
        codes = (x / safe).round_().clamp_(-7, 7).add_(8).to(torch.uint8).reshape(-1, 2)
        packed = codes[:, 0] | (codes[:, 1] << 4)
        return [packed, as_bytes(scale)]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return self._quantize(k) + self._quantize(v)

    def _dequantize(self, part: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        heads, tokens, dim = shape
        groups = self._groups(dim)
        n_codes = heads * tokens * groups * self.group // 2
        packed = part[:n_codes]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(heads, tokens, groups, self.group)
        scale = part[n_codes:].view(torch.float16).view(heads, tokens, groups, 1)
        x = (codes.to(torch.float32) - 8.0) * scale.to(torch.float32)
        return x.view(heads, tokens, groups * self.group)[..., :dim].to(dtype).contiguous()

    def decode(self, blob: torch.Tensor, shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        half = blob.numel() // 2
        return self._dequantize(blob[:half], shape, dtype), self._dequantize(blob[half:], shape, dtype)


Codec = RawCodec | PerTokenCodec | GroupInt4Codec
CODECS: dict[str, Codec] = {
    "raw": RawCodec(),
    "fp8": PerTokenCodec("fp8", torch.float8_e4m3fn, 448.0),
    "int8": PerTokenCodec("int8", torch.int8, 127.0),
    "int4": GroupInt4Codec(),
}


def get_codec(name: str) -> Codec:
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
