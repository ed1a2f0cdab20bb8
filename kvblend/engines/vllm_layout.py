"""Reading KV back out of vLLM's paged cache, whatever the attention backend's inner layout.

Writing is easy: the backend's own `impl.do_kv_cache_update` (CPU: `cpu_attn_reshape_and_cache`,
CUDA FlashAttention: `reshape_and_cache_flash`) puts [tokens, kv_heads, head_dim] rows where its
kernels expect them. Reading is not: vLLM has no gather op for the CPU backend, and its inner
layout is kernel specific (fp32 keys transposed per block, bf16 AMX tiles interleaved). So the
layout is measured, not assumed: the backend's own write fills one scratch block with element
indices (in base-64 digits, exact even in bf16), and where each index lands is where that element
lives in every block. Valid for unquantized caches (kv_cache_dtype "auto"), where a write is a
pure copy.
"""
from __future__ import annotations

import math

import torch

_BASE = 64  # digits below 256 are exact in fp32, fp16 and bf16


def probe_block_layout(layer, kv_cache: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat offsets within one block of K and V elements, each [block_size, kv_heads, head_dim]."""
    if getattr(layer.impl, "kv_cache_dtype", "auto") != "auto":
        raise NotImplementedError("reading a quantized KV cache back is not supported")
    heads, dim = layer.num_kv_heads, layer.head_size
    count = block_size * heads * dim
    index = torch.arange(count).view(block_size, heads, dim)
    slots = torch.arange(block_size, device=kv_cache.device)
    scratch = torch.empty((1, *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)

    def write(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scratch.fill_(-1)
        dev, dt = kv_cache.device, kv_cache.dtype
        layer.impl.do_kv_cache_update(layer, k.to(dev, dt), v.to(dev, dt), scratch, slots)
        return scratch.reshape(-1).float().cpu().clone()  # scratch is reused: copy

    zeros, ones = torch.zeros(index.shape), torch.ones(index.shape)
    k_first, v_first = write(zeros, ones), write(ones, zeros)  # a slot that flips holds K or V; padding does not
    decoded = torch.zeros_like(k_first, dtype=torch.long)
    for p in range(max(1, math.ceil(math.log(count, _BASE)))):
        digit = (index // _BASE**p) % _BASE
        decoded += write(digit.float(), digit.float()).long() * _BASE**p
    offsets = []
    for mask in ((k_first == 0) & (v_first == 1), (k_first == 1) & (v_first == 0)):
        where = mask.nonzero().squeeze(1)
        table = torch.full((count,), -1, dtype=torch.long)
        table[decoded[where]] = where
        if (table < 0).any():
            raise RuntimeError("the backend's cache write is not a plain copy: cannot read the cache back")
        offsets.append(table.view(block_size, heads, dim).to(kv_cache.device))
    return offsets[0], offsets[1]


def gather_tokens(kv_cache: torch.Tensor, offsets: torch.Tensor, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """Tokens 0..num_tokens-1 of a request, [kv_heads, num_tokens, head_dim], from one layer's cache."""
    block_size = offsets.shape[0]
    pos = torch.arange(num_tokens, device=kv_cache.device)
    blocks = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)[pos // block_size]
    flat = kv_cache.reshape(kv_cache.shape[0], -1)
    return flat[blocks[:, None, None], offsets[pos % block_size]].transpose(0, 1).contiguous()
