"""Chunk encoding: tokenize a chunk alone, run one forward over [chunk context] + chunk, keep
position-free keys and values of the chunk tokens, and name the result by a content hash."""
from __future__ import annotations

import hashlib
import json

import torch

from kvblend.blend.plan import PromptBuilder
from kvblend.kernels import plan_attention, rotate, selected_attention
from kvblend.models.adapter import LayerwiseModel
from kvblend.store.base import ChunkKV

# Bump whenever the way a chunk's KV is computed or laid out changes: old caches become misses.
RECIPE_VERSION = "kvblend-chunk-v1:prerope-keys"


def chunk_key(fingerprint: str, context_ids: list[int], token_ids: list[int], dtype: torch.dtype) -> str:
    """Content key over (model fingerprint, dtype, recipe, chunk context, chunk tokens)."""
    payload = json.dumps([fingerprint, str(dtype), RECIPE_VERSION, list(context_ids), list(token_ids)])
    return hashlib.sha256(payload.encode()).hexdigest()


# A neutral passage (no facts a RAG question would ask about) that "primed" chunks are encoded after.
PRIMER = (
    "The botanic garden was founded in 1759 on the banks of a slow river. Its glasshouses hold plants from every "
    "continent, arranged by climate rather than by family, and its library keeps more than half a million herbarium "
    "sheets. Visitors follow a circular path past the palm house, a lake and a pagoda built for a royal visit. The "
    "garden is run by a public trust that employs gardeners, scientists and teachers. Its seed bank stores samples of "
    "tens of thousands of species in cold vaults, so that plants lost in the wild can be grown again."
)


def resolve_chunk_context(spec: str | list[int], builder: PromptBuilder, primer: str | None = None) -> list[int]:
    """The token ids every chunk is encoded after: 'bos' → [BOS] when the tokenizer has one,
    'head' → the prompt's template head, 'primed' → the head, `primer` (default: a neutral passage)
    and the separator, 'none' → [], a list → itself.

    'head' encodes every chunk as if it stood first in a prompt (the first chunk then reuses exactly
    its full-prefill KV). 'primed' encodes it as if it followed another document, which is where all
    but the first chunk of a prompt stand: its cached KV is closer to what a full prefill computes,
    the more so when the primer is a passage of the same corpus (README).
    """
    if isinstance(spec, list):
        return list(spec)
    if spec == "none":
        return []
    bos = [builder.tokenizer.bos_token_id] if builder.tokenizer.bos_token_id is not None else []
    head = builder.encode(builder.head) if builder.head else bos
    if spec == "head" and head:
        return head
    if spec == "primed":
        return head + builder.encode(primer or PRIMER) + (builder.encode(builder.separator) if builder.separator else [])
    return bos


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
