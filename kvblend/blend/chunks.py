"""Chunk encoding: tokenize a chunk alone, run it after its chunk context (whose forward runs once per
model and context), keep position-free keys and values of the chunk tokens, and name the result by a
content hash."""
from __future__ import annotations

import hashlib
import json
import weakref

import torch

from kvblend.blend.plan import PromptBuilder
from kvblend.kernels import plan_attention, rotate, selected_attention
from kvblend.models.adapter import LayerwiseModel, rope_depends_on_length
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


# Per model, the last chunk context's per-layer (rotated keys, values): every chunk of a store is
# encoded after the same context (a primer of hundreds of tokens), so that forward runs once.
_contexts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward(adapter, ids: torch.Tensor, start: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None):
    """The layers over `ids` at positions start.. after `past` (per layer, rotated keys and values of
    positions 0..start-1); returns per layer (pre-RoPE keys, rotated keys, values) of `ids`. The last
    layer's attention is skipped: nothing reads its output."""
    n = start + ids.numel()
    cos, sin = adapter.rope_tables(n, start)
    plan = plan_attention(torch.arange(start, n, device=ids.device), n, 1)
    h = adapter.embed(ids)
    layers = []
    for i in range(adapter.num_layers):
        q, k, v = adapter.qkv(i, h)
        k_rot = rotate(k, cos, sin)
        layers.append((k, k_rot, v))
        if i == adapter.num_layers - 1:
            break
        keys, values = (torch.cat([past[i][0], k_rot], 1), torch.cat([past[i][1], v], 1)) if past else (k_rot, v)
        h = adapter.mlp(i, adapter.attn_out(i, h, selected_attention(rotate(q, cos, sin), keys, values, plan, adapter.scaling)))
    return layers


def _context_layers(adapter, context_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (rotated keys, values) of the chunk context, computed once per model and context;
    None when the context must run with each chunk (a RoPE whose table depends on the sequence length)."""
    rope_type = getattr(getattr(adapter, "rotary", None), "rope_type", None) or "default"  # vLLM's tables are fixed
    if not context_ids or rope_depends_on_length(rope_type):
        return None
    held = _contexts.get(adapter)
    if held is None or held[0] != tuple(context_ids):
        ids = torch.tensor(list(context_ids), device=adapter.device)
        held = (tuple(context_ids), [(k_rot, v) for _, k_rot, v in _forward(adapter, ids, 0, None)])
        _contexts[adapter] = held
    return held[1]


@torch.inference_mode()
def encode_chunk(adapter: LayerwiseModel, context_ids: list[int], token_ids: list[int], key: str) -> ChunkKV:
    """The chunk rows' pre-RoPE K and V for every layer, from a forward over context + chunk (the
    context's part computed once per model and context, then only the chunk's rows run)."""
    if not token_ids:
        raise ValueError("cannot encode an empty chunk (it has no tokens)")
    skip = len(context_ids)
    if skip + len(token_ids) > adapter.max_positions:
        raise ValueError(f"chunk of {len(token_ids)} tokens (+{skip} context) exceeds the model's {adapter.max_positions} positions")
    past = _context_layers(adapter, context_ids)
    if past is None:  # one pass over context + chunk
        layers = _forward(adapter, torch.tensor(list(context_ids) + list(token_ids), device=adapter.device), 0, None)
        layers = [(k[:, skip:], v[:, skip:]) for k, _, v in layers]
    else:
        layers = [(k, v) for k, _, v in _forward(adapter, torch.tensor(list(token_ids), device=adapter.device), skip, past)]
    return ChunkKV(key=key, fingerprint=adapter.fingerprint, keys=torch.stack([k for k, _ in layers]).contiguous(),
                   values=torch.stack([v for _, v in layers]).contiguous())
