"""Chunk encoding: tokenize a chunk alone, run one forward over [chunk context] + chunk, keep
position-free keys and values of the chunk tokens, and name the result by a content hash."""
from __future__ import annotations

import hashlib
import json

import torch

from kvblend.kernels import plan_attention, rotate, selected_attention
from kvblend.models.adapter import LayerwiseModel
from kvblend.store.base import ChunkKV

# Bump whenever the way a chunk's KV is computed or laid out changes: old caches become misses.
RECIPE_VERSION = "kvblend-chunk-v1:prerope-keys"


def chunk_key(fingerprint: str, context_ids: list[int], token_ids: list[int], dtype: torch.dtype) -> str:
    """Content key over (model fingerprint, dtype, recipe, chunk context, chunk tokens)."""
    payload = json.dumps([fingerprint, str(dtype), RECIPE_VERSION, list(context_ids), list(token_ids)])
    return hashlib.sha256(payload.encode()).hexdigest()


def resolve_chunk_context(spec: str | list[int], tokenizer, head_ids: list[int]) -> list[int]:
    """'bos' → [BOS] when the tokenizer has one, 'head' → the prompt's template head (`head_ids`),
    'none' → [], a list → itself.

    'head' encodes every chunk as if it stood first in a prompt: the first chunk of a prompt then
    reuses exactly its full-prefill KV, and the others at least see the real sink and system text.
    """
    if isinstance(spec, list):
        return list(spec)
    if spec == "none":
        return []
    if spec == "head" and head_ids:
        return list(head_ids)
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


@torch.inference_mode()
def encode_chunk(adapter: LayerwiseModel, context_ids: list[int], token_ids: list[int], key: str) -> ChunkKV:
    """One forward over context + chunk; returns the chunk rows' pre-RoPE K and V for every layer."""
    if not token_ids:
        raise ValueError("cannot encode an empty chunk (it has no tokens)")
    ids = torch.tensor(list(context_ids) + list(token_ids), device=adapter.device)
    n, skip = ids.numel(), len(context_ids)
    if n > adapter.max_positions:
        raise ValueError(f"chunk of {len(token_ids)} tokens (+{skip} context) exceeds the model's {adapter.max_positions} positions")
    cos, sin = adapter.rope_tables(n)
    plan = plan_attention(torch.arange(n, device=ids.device), n, 1)
    h = adapter.embed(ids)
    keys, values = [], []
    for i in range(adapter.num_layers):
        q, k, v = adapter.qkv(i, h)
        keys.append(k[:, skip:])
        values.append(v[:, skip:])
        if i == adapter.num_layers - 1:
            break  # the last layer's output is not needed for its KV
        attn = selected_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, plan, adapter.scaling)
        h = adapter.mlp(i, adapter.attn_out(i, h, attn))
    return ChunkKV(key=key, fingerprint=adapter.fingerprint, keys=torch.stack(keys).contiguous(), values=torch.stack(values).contiguous())
