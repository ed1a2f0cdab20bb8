"""The serialized object: the same bytes on disk and on the wire.

    prefix   magic "KVBL", format version, flags, header length, header checksum (xxh3-64)
    header   JSON: key, model fingerprint, dtype, codec, shapes, per-layer byte size and checksums
    padding  to a 64-byte boundary
    layers   layer 0's blob, layer 1's blob, ... (all the same size)

Each layer has its own checksum, so a reader can fetch, verify and use one layer at a time
(layer-wise pipelining) and still never hand out a corrupted byte.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property

import torch
import xxhash

from kvblend.store.base import ChunkKV
from kvblend.store.codecs import get_codec

MAGIC = b"KVBL"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<4sHHIQ")  # magic, version, flags, header length, header checksum
ALIGN = 64
HEAD_READ = 4096  # bytes read first: the prefix and, almost always, the whole header
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CorruptObject(Exception):
    """A stored object that must not be used: damaged, truncated, foreign or of another format."""


class CodecMismatch(CorruptObject):
    """A sound object in a codec other than the one the reading store is configured for: a miss.

    Why a check and not the codec in the cache key: the key names the content (model, dtype,
    chunk context, tokens), which every codec encodes, so one store holds one object per chunk,
    corpus manifests and indices stay valid whatever the codec, and `kvblend store recode`
    converts a store in place. A reader configured for codec X must still never serve Y's values
    (raw readers would silently get quantized KV), so an object in Y is a miss like a damaged one:
    the reader recomputes and its write replaces the object with X. Instances sharing a tier are
    meant to share one codec; when they do not, each warns naming both codecs, and each still
    serves only its own.
    """


def check_codec(header: "ObjectHeader", codec: str | None, where: str) -> None:
    """Raise CodecMismatch unless `codec` is None (maintenance: any codec) or the header's codec."""
    if codec is not None and header.codec != codec:
        raise CodecMismatch(f"{where}: stored in codec {header.codec}, this store is configured for {codec}")


def layer_hasher() -> xxhash.xxh3_64:
    """A fresh hasher of the per-layer checksum, fed part by part (a reader hashes as bytes land)."""
    return xxhash.xxh3_64()


def checksum(parts: list[torch.Tensor] | list[memoryview]) -> int:
    h = layer_hasher()
    for part in parts:
        h.update(part.numpy() if isinstance(part, torch.Tensor) else part)
    return h.intdigest()


@dataclass(frozen=True)
class ObjectHeader:
    key: str
    fingerprint: str
    dtype: str
    codec: str
    num_layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    layer_nbytes: int
    checksums: tuple[int, ...]

    @property
    def layer_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.tokens, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @cached_property
    def data_offset(self) -> int:
        return -(-(PREFIX.size + len(self._json())) // ALIGN) * ALIGN

    @property
    def total_nbytes(self) -> int:
        return self.data_offset + self.num_layers * self.layer_nbytes

    def layer_offset(self, i: int) -> int:
        return self.data_offset + i * self.layer_nbytes

    def _json(self) -> bytes:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        body = self._json()
        prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(body), xxhash.xxh3_64_intdigest(body))
        return (prefix + body).ljust(self.data_offset, b"\0")

    def verify_layer(self, i: int, blob: torch.Tensor | memoryview) -> None:
        self.verify_digest(i, checksum([blob]))

    def verify_digest(self, i: int, digest: int) -> None:
        if digest != self.checksums[i]:
            raise CorruptObject(f"object {self.key}: layer {i} fails its checksum")


def encode_object(kv: ChunkKV, codec_name: str) -> tuple[ObjectHeader, list[list[torch.Tensor]]]:
    """The header and each layer's blob parts (CPU uint8 tensors) of `kv` in codec `codec_name`."""
    dtype = next((name for name, d in DTYPES.items() if d == kv.dtype), None)
    if dtype is None:
        raise ValueError(f"chunk {kv.key}: dtype {kv.dtype} cannot be stored (supported: {', '.join(DTYPES)})")
    codec = get_codec(codec_name)
    blobs = [codec.encode(*kv.layer(i)) for i in range(kv.num_layers)]
    heads, tokens, dim = kv.layer_shape
    header = ObjectHeader(
        key=kv.key, fingerprint=kv.fingerprint, dtype=dtype, codec=codec_name, num_layers=kv.num_layers,
        kv_heads=heads, tokens=tokens, head_dim=dim, layer_nbytes=codec.layer_nbytes(kv.layer_shape, kv.dtype),
        checksums=tuple(checksum(parts) for parts in blobs),
    )
    return header, blobs


def parse_header(read_at: Callable[[int, int], bytes], key: str | None, where: str) -> ObjectHeader:
    """Read and check an object's header through read_at(offset, length); `where` names it in errors.

    Raises CorruptObject for a bad magic, version, checksum or field, or a key other than `key`.
    """
    head = read_at(0, HEAD_READ)
    if len(head) < PREFIX.size:
        raise CorruptObject(f"{where}: truncated header ({len(head)} bytes)")
    magic, version, _flags, length, digest = PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise CorruptObject(f"{where}: not a kvblend object (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise CorruptObject(f"{where}: format version {version}, this kvblend reads {FORMAT_VERSION}")
    body = head[PREFIX.size : PREFIX.size + length]
    if len(body) < length:
        body += read_at(PREFIX.size + len(body), length - len(body))
    if len(body) != length or xxhash.xxh3_64_intdigest(body) != digest:
        raise CorruptObject(f"{where}: header fails its checksum")
    try:
        fields = json.loads(body)
        header = ObjectHeader(**{**fields, "checksums": tuple(fields["checksums"])})
        codec = get_codec(header.codec)
        valid = header.dtype in DTYPES and len(header.checksums) == header.num_layers
        valid = valid and header.layer_nbytes == codec.layer_nbytes(header.layer_shape, header.torch_dtype)
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptObject(f"{where}: malformed header ({exc})") from exc
    if not valid:
        raise CorruptObject(f"{where}: inconsistent header fields")
    if key is not None and header.key != key:
        raise CorruptObject(f"{where}: holds key {header.key[:16]}…, not {key[:16]}…")
    return header
