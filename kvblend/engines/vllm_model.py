"""vLLM's loaded Llama-family model seen layer by layer, for kvblend's blend inside vLLM's worker.

`VllmLayerwiseModel` gives `BlendExecutor` and `encode_chunk` the interface of
`kvblend.models.LayerwiseModel` (embed → per layer qkv / attention output / MLP → logits) on the
modules and weights vLLM loaded, so the blend needs no second copy of the weights. It calls
vLLM's own modules (fused `qkv_proj` and `gate_up_proj`, its RMSNorm, SiLU·mul, `o_proj`,
`down_proj`, `compute_logits`), which run whatever kernels and weight layouts vLLM chose (on CPU,
prepacked GEMMs). The rotary tables are vLLM's `cos_sin_cache`, so keys the blend rotates match
the queries vLLM rotates when it decodes.

Covers the families vLLM implements with these module names (Llama, Mistral, Qwen2, Qwen3), with
tensor and pipeline parallel size 1 and the neox rotary layout over the whole head.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from kvblend.models.adapter import MLP_ROWS, UnsupportedModelError, sliding_window, supported_architecture
from kvblend.models.fingerprint import checkpoint_fingerprint
from kvblend.models.rope import RopeTables, duplicate_halves


class VllmLayerwiseModel:
    """A vLLM `*ForCausalLM` (Llama family) seen as embed → layers (qkv, attention output, mlp) → logits.

    `checkpoint` is the folder vLLM loaded the weights from (`ModelConfig.model`): the fingerprint is
    computed from its files (kvblend.models.fingerprint), on first use, so that chunk keys match
    the ones the transformers side makes for the same weights."""

    def __init__(self, model: nn.Module, checkpoint: str | Path):
        self.model, self.checkpoint = model, str(checkpoint)
        self.config = cfg = model.config
        self.architecture = supported_architecture(model)
        inner = model.model
        self.layers = list(inner.layers)
        _check_single_rank(inner, len(self.layers), cfg)
        first = self.layers[0].self_attn
        self.head_dim, self.scaling = int(first.head_dim), float(first.scaling)
        self.num_heads, self.num_kv_heads = int(first.num_heads), int(first.num_kv_heads)
        self.num_layers = len(self.layers)
        self.embed_tokens, self.final_norm = inner.embed_tokens, inner.norm
        self.sliding_window = sliding_window(cfg, self.architecture)
        self.rotary = first.rotary_emb
        _check_rotary(self.rotary, self.head_dim)
        for layer in self.layers:
            if getattr(layer.self_attn, "do_llama_4_scaling", False):
                raise UnsupportedModelError("Llama-4 query scaling by position is not supported")
        cache_rows = self.rotary.cos_sin_cache.shape[0]
        self.max_positions = min(int(getattr(cfg, "max_position_embeddings", cache_rows)), cache_rows)
        self._rope = RopeTables(self._rotary_table)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @cached_property
    def fingerprint(self) -> str:
        """The checkpoint's print in the load dtype: the transformers side's print for the same weights."""
        return checkpoint_fingerprint(self.checkpoint, self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids → [T, hidden]."""
        return self.embed_tokens(ids)

    def rope_tables(self, end: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [end - start, head_dim] for positions start..end-1, in kvblend's duplicated-halves
        layout, from the cache vLLM's rotary embedding rotates with."""
        if end > self.max_positions:
            raise ValueError(f"positions up to {end - 1} are past the model's {self.max_positions}")
        return self._rope(end, start)

    def _rotary_table(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary.cos_sin_cache[start : min(end, self.max_positions)].chunk(2, dim=-1)
        cos, sin = duplicate_halves(cos, sin)
        return cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-RoPE q [H, T, D], k [KV, T, D] and v [KV, T, D] of layer i for hidden states h [T, hidden]."""
        layer = self.layers[i]
        attn = layer.self_attn
        x, _ = attn.qkv_proj(layer.input_layernorm(h))
        t, d = h.shape[0], self.head_dim
        q, k, v = x.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q, k = q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d)
        if getattr(attn, "q_norm", None) is not None and getattr(attn, "qk_norm", True):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(0, 1), k.transpose(0, 1), v.view(t, self.num_kv_heads, d).transpose(0, 1)

    def attn_out(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output attn [H, T, D] onto h [T, hidden]."""
        out, _ = self.layers[i].self_attn.o_proj(attn.transpose(0, 1).reshape(h.shape[0], -1))
        return out.add_(h)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Residual add of layer i's MLP onto h [T, hidden], MLP_ROWS tokens at a time (as LayerwiseModel.mlp)."""
        layer = self.layers[i]
        out = torch.empty_like(h)
        for rows in range(0, h.shape[0], MLP_ROWS):
            part = h[rows : rows + MLP_ROWS]
            torch.add(part, layer.mlp(layer.post_attention_layernorm(part)), out=out[rows : rows + MLP_ROWS])
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] in float32 for final hidden states h [T, hidden] (vLLM's logits processor:
        its vocabulary padding cut off, its scaling and soft cap applied)."""
        return self.model.compute_logits(self.final_norm(h)).float()


def _check_single_rank(inner: nn.Module, num_layers: int, cfg) -> None:
    """The model holds every layer and whole heads: tensor and pipeline parallel size 1."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
        raise UnsupportedModelError("the in-worker blend needs tensor and pipeline parallel size 1")
    if num_layers != cfg.num_hidden_layers:
        raise UnsupportedModelError(f"{num_layers} of the config's {cfg.num_hidden_layers} layers loaded")


def _check_rotary(rotary: nn.Module, head_dim: int) -> None:
    """vLLM's rotary must rotate the whole head in the neox (halves) layout from one position table."""
    cache = getattr(rotary, "cos_sin_cache", None)
    if cache is None or cache.dim() != 2 or not getattr(rotary, "is_neox_style", False):
        raise UnsupportedModelError(f"rotary embedding {type(rotary).__name__} is not a neox-style position table")
    if getattr(rotary, "rotary_dim", head_dim) != head_dim or cache.shape[1] != head_dim:
        raise UnsupportedModelError(f"partial rotary embedding ({cache.shape[1]} of {head_dim} head dims) is not supported")
