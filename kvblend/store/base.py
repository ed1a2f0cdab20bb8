"""What the blend asks of a store: chunk KV by content key, readable one layer at a time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class ChunkKV:
    """One chunk's KV for every layer: keys position-free (pre-RoPE), values as computed.

    keys, values: [layers, kv_heads, tokens, head_dim]. `fingerprint` names the model that made
    them, so a consumer can refuse a foreign cache even if a key collided.
    """

    key: str
    fingerprint: str
    keys: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.dim() != 4:
            raise ValueError(f"chunk {self.key}: keys {tuple(self.keys.shape)} / values {tuple(self.values.shape)} must both be [layers, kv_heads, tokens, head_dim]")

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def layer_shape(self) -> tuple[int, int, int]:
        """(kv_heads, tokens, head_dim) of one layer's keys (and values)."""
        return tuple(self.keys.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer i, each [kv_heads, tokens, head_dim]."""
        return self.keys[i], self.values[i]


@runtime_checkable
class KVStore(Protocol):
    """A store of `ChunkKV` by content key. A miss (absent, corrupt, foreign) returns None.

    `get` may return a lazily read object with ChunkKV's read-only face (key, fingerprint,
    num_layers, num_tokens, layer_shape, dtype, layer(i)) instead of a ChunkKV.
    """

    def get(self, key: str) -> ChunkKV | None: ...

    def put(self, key: str, kv: ChunkKV) -> None: ...

    def contains(self, key: str) -> bool: ...
