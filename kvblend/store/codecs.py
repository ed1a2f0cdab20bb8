"""How one layer's K/V become bytes in a serialized tier: raw, quantized per token, or 4-bit in groups.

A layer blob is the concatenation of the codec's parts. The 8-bit codecs keep one float32
scale per (head, token) — the row's max magnitude over head_dim mapped to the code's range —
so an outlier token does not flatten its neighbours; int4 keeps one float16 scale per 32 values
(keys per channel, values per token). Sizes and quality costs: docs/benchmarks.md (Codecs). Each object's
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
    """4-bit codes with one float16 scale per `group` values, keys per channel and values per token
    (as KIVI does): [K nibbles | K scales | V nibbles | V scales].

    Keys have outlier channels: grouped along a row, one outlier coarsens its 31 neighbours; grouped
    along tokens within a channel, each channel gets its own scale (half the keys' error measured on
    the default model). Values have no such channels and are grouped along head_dim. Codes are
    round(x / scale) in [-7, 7], scale = the group's max magnitude / 7 rounded to float16 first
    (so codes fit the scales a reader uses), stored as code + 8, two per byte (even index low).
    Keys: codes in [head, channel, token] order, scales per (head, channel, group of tokens; the
    last group may be short). Values: rows padded with zeros to a whole number of groups; a row
    shorter than `group` is one group. Sizes and quality: docs/benchmarks.md (Codecs).
    """

    name = "int4"

    def __init__(self, group: int = 32):
        if group % 2:
            raise ValueError(f"int4 groups hold pairs of nibbles: group {group} must be even")
        self.group = group

    def _row_group(self, dim: int) -> int:
        return min(self.group, dim + dim % 2)

    def _key_nbytes(self, shape: Shape) -> tuple[int, int]:
        heads, tokens, dim = shape
        return -(-heads * dim * tokens // 2), heads * dim * -(-tokens // self.group) * 2

    def _value_nbytes(self, shape: Shape) -> tuple[int, int]:
        heads, tokens, dim = shape
        group = self._row_group(dim)
        groups = heads * tokens * -(-dim // group)
        return groups * group // 2, groups * 2

    def layer_nbytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return sum(self._key_nbytes(shape)) + sum(self._value_nbytes(shape))

    @staticmethod
    def _codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., groups, group] → (uint8 codes + 8 of the same shape, float16 scales [..., groups, 1])."""
        scale = (x.abs().amax(dim=-1, keepdim=True) / 7.0).to(torch.float16)
        safe = scale.float().masked_fill(scale == 0, 1.0)
        return (x / safe).round_().clamp_(-7, 7).add_(8).to(torch.uint8), scale

    @staticmethod
    def _pack(codes: torch.Tensor) -> torch.Tensor:
        flat = codes.reshape(-1)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_full((1,), 8)])
        pairs = flat.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)

    @staticmethod
    def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
        return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)[:n].to(torch.float32) - 8.0

    def _encode_keys(self, k: torch.Tensor) -> list[torch.Tensor]:
        heads, tokens, dim = k.shape
        x = k.detach().to("cpu", torch.float32).transpose(1, 2)  # [heads, dim, tokens]
        pad = -tokens % self.group
        x = torch.nn.functional.pad(x, (0, pad)).reshape(heads, dim, -1, self.group)
        codes, scale = self._codes(x)
        codes = codes.reshape(heads, dim, tokens + pad)[..., :tokens]
        return [self._pack(codes), as_bytes(scale)]

    def _encode_values(self, v: torch.Tensor) -> list[torch.Tensor]:
        heads, tokens, dim = v.shape
        group = self._row_group(dim)
        x = v.detach().to("cpu", torch.float32)
        x = torch.nn.functional.pad(x, (0, -dim % group)).reshape(heads, tokens, -1, group)
        codes, scale = self._codes(x)
        return [self._pack(codes), as_bytes(scale)]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return self._encode_keys(k) + self._encode_values(v)

    def _decode_keys(self, part: torch.Tensor, shape: Shape) -> torch.Tensor:
        heads, tokens, dim = shape
        n_codes, _ = self._key_nbytes(shape)
        codes = self._unpack(part[:n_codes], heads * dim * tokens).view(heads, dim, tokens)
        scale = part[n_codes:].view(torch.float16).view(heads, dim, -1).to(torch.float32)
        scale = scale.repeat_interleave(self.group, dim=-1)[..., :tokens]
        return (codes * scale).transpose(1, 2)

    def _decode_values(self, part: torch.Tensor, shape: Shape) -> torch.Tensor:
        heads, tokens, dim = shape
        group = self._row_group(dim)
        n_codes, _ = self._value_nbytes(shape)
        codes = self._unpack(part[:n_codes], n_codes * 2).view(heads, tokens, -1, group)
        scale = part[n_codes:].view(torch.float16).view(heads, tokens, -1, 1).to(torch.float32)
        return (codes * scale).view(heads, tokens, -1)[..., :dim]

    def decode(self, blob: torch.Tensor, shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k_bytes = sum(self._key_nbytes(shape))
        k = self._decode_keys(blob[:k_bytes], shape)
        v = self._decode_values(blob[k_bytes:], shape)
        return k.to(dtype).contiguous(), v.to(dtype).contiguous()


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
