"""Reference engine: greedy decoding from a fused KV with the layer-wise adapter alone.

It shares no code with transformers' cache or attention dispatch, so agreeing with it is real
evidence that another engine (HF DynamicCache, vLLM paged cache) was handed the right KV.
"""
from __future__ import annotations

import torch

from kvblend.kernels import plan_attention, rotate, selected_attention
from kvblend.models.adapter import LayerwiseModel


@torch.inference_mode()
def reference_decode(
    m: LayerwiseModel, keys: list[torch.Tensor], values: list[torch.Tensor], first_logits: torch.Tensor, max_new_tokens: int
) -> list[int]:
    """Greedy tokens continuing a prompt whose per-layer KV [KV, N, D] is given."""
    keys, values = list(keys), list(values)
    n = keys[0].shape[1]
    tokens = [int(first_logits.argmax())]
    for pos in range(n, n + max_new_tokens - 1):
        at = torch.tensor([pos], device=m.device)
        plan = plan_attention(at, pos + 1, m.num_heads // m.num_kv_heads)
        cos, sin = m.rope_tables(pos + 1, pos)  # what transformers' decode step at pos rotates with
        h = m.embed(torch.tensor([tokens[-1]], device=m.device))
        for i in range(m.num_layers):
            q, k, v = m.qkv(i, h)
            keys[i] = torch.cat([keys[i], rotate(k, cos, sin)], dim=1)
            values[i] = torch.cat([values[i], v], dim=1)
            attn = selected_attention(rotate(q, cos, sin), keys[i], values[i], plan, m.scaling)
            h = m.mlp(i, m.attn_out(i, h, attn))
        tokens.append(int(m.logits(h)[-1].argmax()))
    return tokens
