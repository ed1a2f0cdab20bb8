"""Run a transformers causal LM layer by layer from its own modules.

The blend needs to stop inside a layer (after Q/K/V, before attention) and to run a layer on a
subset of tokens, which `model.forward` cannot do. `LayerwiseModel` exposes the pieces of a
decoder layer as plain functions on one sequence, reusing the model's own weights, norms and
rotary embedding. Q/K/V and gate/up weights are fused into one matrix each; the original
modules are re-pointed at views of it, so no weight is stored twice. RMSNorm and SiLU·up run
kvblend's one-pass kernels (kvblend.kernels.norm_act) and the residual adds ride in the output
GEMMs (`torch.addmm`), which saves passes over the activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvblend.kernels import rms_norm, silu_mul
from kvblend.models.fingerprint import model_fingerprint
from kvblend.models.huge_pages import ADVISABLE, HugePageArena
from kvblend.models.rope import RopeTables

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
MLP_ROWS = 1024  # tokens per MLP block (see LayerwiseModel.mlp)


class UnsupportedModelError(ValueError):
    pass


@dataclass
class FusedLayer:
    """One decoder layer's weights in the shapes the layer-wise executor wants."""

    input_norm: nn.Module
    post_norm: nn.Module
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    o_proj: nn.Linear
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_proj: nn.Linear
    act: nn.Module


def _fuse(linears: list[nn.Linear], arena: HugePageArena | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the linears' weights (into the arena, if any) and re-point each linear at its slice."""

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        if arena is None:
            return torch.cat(parts, dim=0)
        return torch.cat(parts, dim=0, out=arena.empty((sum(t.shape[0] for t in parts), *parts[0].shape[1:]), parts[0].dtype))

    weight = cat([lin.weight.data for lin in linears])
    has_bias = linears[0].bias is not None
    bias = cat([lin.bias.data for lin in linears]) if has_bias else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


def rope_depends_on_length(rope_type: str) -> bool:
    """Whether transformers derives the type's frequencies from each call's last position (its `dynamic_rope_update`)."""
    return "dynamic" in rope_type or rope_type == "longrope"


def supported_architecture(model: nn.Module) -> str:
    """The config's model_type when kvblend runs that family layer by layer, else UnsupportedModelError."""
    arch = getattr(model.config, "model_type", type(model).__name__)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} ({type(model).__name__}) is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def check_architecture(model: nn.Module) -> str:
    """The model's architecture name, or UnsupportedModelError when kvblend cannot run it layer by layer."""
    arch = supported_architecture(model)
    head_dim = model.model.layers[0].self_attn.head_dim
    rotary_dim = model.model.rotary_emb.inv_freq.numel() * 2
    if rotary_dim != head_dim:  # transformers' own forward for these families cannot run it either
        raise UnsupportedModelError(f"partial rotary embedding ({rotary_dim} of {head_dim} head dims rotated) is not supported")
    return arch


def fuse_layers(layers: nn.ModuleList, arena: HugePageArena | None) -> list[FusedLayer]:
    """Each decoder layer's Q/K/V and gate/up weights fused (into the arena, if any)."""
    fused = []
    with torch.no_grad():
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], arena)
            gu_w, gu_b = _fuse([mlp.gate_proj, mlp.up_proj], arena)
            fused.append(FusedLayer(
                input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm, qkv_weight=qkv_w,
                qkv_bias=qkv_b, q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                o_proj=attn.o_proj, gate_up_weight=gu_w, gate_up_bias=gu_b, down_proj=mlp.down_proj, act=mlp.act_fn,
            ))
    return fused


def weight_arena(model: nn.Module) -> HugePageArena | None:
    """A huge-page arena sized for the model's weights, for a CPU model where the kernel takes the advice."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return HugePageArena(HugePageArena.size_for(model)) if on_cpu and ADVISABLE else None


class LayerwiseModel:
    """A decoder-only model seen as embed → layers (qkv, attention output, mlp) → logits."""

    def __init__(self, model: nn.Module):
        self.architecture = check_architecture(model)
        cfg, inner = model.config, model.model
        self.model, self.config = model, cfg
        self.sliding_window = sliding_window(cfg, self.architecture)
        self.embed_tokens, self.final_norm, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head
        self.rotary = inner.rotary_emb
        self._rope = RopeTables(self._rotary_table)  # static rope types only (see rope_tables)
        first = inner.layers[0].self_attn
        self.head_dim, self.scaling = first.head_dim, first.scaling
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_layers = len(inner.layers)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        self.silu_gate = getattr(cfg, "hidden_act", None) == "silu"
        arena = weight_arena(model)
        self.layers = fuse_layers(inner.layers, arena)
        if arena is not None:
            with torch.no_grad():
                arena.adopt(model)  # every other weight (embedding, norms, o_proj, down_proj) follows
        self.fingerprint = model_fingerprint(model)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids → [T, hidden]."""
        return self.embed_tokens(ids)

    def rope_tables(self, end: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [end - start, head_dim] for positions start..end-1, as the model's forward over
        exactly those positions makes them: transformers derives dynamic and longrope frequencies
        from the last position of each call, so those tables are built per call; the others are
        slices of one table, grown when a longer one is asked for."""
        if rope_depends_on_length(self.rotary.rope_type):
            return self._rotary_table(start, end)
        return self._rope(end, start)

    def _rotary_table(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, end, device=self.device)[None]
        cos, sin = self.rotary(torch.empty(0, dtype=self.dtype, device=self.device), pos)
        return cos[0], sin[0]

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-RoPE q [H, T, D], k [KV, T, D] and v [KV, T, D] of layer i for hidden states h [T, hidden]."""
        layer = self.layers[i]
        x = F.linear(_norm(layer.input_norm, h), layer.qkv_weight, layer.qkv_bias)
        t, d = h.shape[0], self.head_dim
        q, k, v = x.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q = q.view(t, self.num_heads, d)
        k = k.view(t, self.num_kv_heads, d)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        return q.transpose(0, 1), k.transpose(0, 1), v.view(t, self.num_kv_heads, d).transpose(0, 1)

    def attn_out(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output attn [H, T, D] onto h [T, hidden]."""
        return _linear_add(h, attn.transpose(0, 1).reshape(h.shape[0], -1), self.layers[i].o_proj)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Residual add of layer i's MLP onto h [T, hidden], MLP_ROWS tokens at a time.

        Row blocks keep the gate/up buffer (2·intermediate floats per token) under glibc's 32 MB
        mmap ceiling: larger blocks are mapped fresh and unmapped on every call, and page faults on
        fresh pages are dear in a process hosting vLLM (docs/benchmarks.md)."""
        layer = self.layers[i]
        out = torch.empty_like(h)
        for rows in range(0, h.shape[0], MLP_ROWS):
            part = h[rows : rows + MLP_ROWS]
            gate_up = F.linear(_norm(layer.post_norm, part), layer.gate_up_weight, layer.gate_up_bias)
            if self.silu_gate:
                act = silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = layer.act(gate).mul_(up)
            _linear_add(part, act, layer.down_proj, out=out[rows : rows + MLP_ROWS])
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] in float32 for final hidden states h [T, hidden]."""
        return self.lm_head(self.final_norm(h)).float()


def sliding_window(cfg, arch: str) -> int | None:
    """The attention window of a config that uses one (Mistral's by default, Qwen's when `use_sliding_window`)."""
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", arch == "mistral"):
        return int(cfg.sliding_window)
    return None


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm (every supported architecture's norm, eps in `variance_epsilon`) in one pass."""
    eps = getattr(norm, "variance_epsilon", None)
    return norm(x) if eps is None else rms_norm(x, norm.weight, eps)


def _linear_add(residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, out: torch.Tensor | None = None) -> torch.Tensor:
    """residual + linear(x), the add done by the GEMM itself (one pass over the output, no temporary)."""
    y = torch.addmm(residual, x, linear.weight.t(), out=out)
    return y if linear.bias is None else y.add_(linear.bias)
