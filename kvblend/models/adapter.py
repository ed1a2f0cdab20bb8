"""Run a transformers causal LM layer by layer from its own modules.

The blend needs to stop inside a layer (after Q/K/V, before attention) and to run a layer on a
subset of tokens, which `model.forward` cannot do. `LayerwiseModel` exposes the pieces of a
decoder layer as plain functions on one sequence, reusing the model's own weights, norms and
rotary embedding. Q/K/V and gate/up weights are fused into one matrix each; the original
modules are re-pointed at views of it, so no weight is stored twice. RMSNorm and SiLU·up run
kvblend's one-pass kernels (kvblend.kernels.norm_act) and the residual adds ride in the output
GEMMs (`torch.addmm`): 8% less blend time on CPU than the modules' own forward.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvblend.kernels import rms_norm, silu_mul
from kvblend.models.huge_pages import ADVISABLE, HugePageArena

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


class LayerwiseModel:
    """A decoder-only model seen as embed → layers (qkv, attention output, mlp) → logits."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        arch = getattr(cfg, "model_type", type(model).__name__)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} ({type(model).__name__}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", arch == "mistral"):
            self.sliding_window = int(cfg.sliding_window)
        else:
            self.sliding_window = None
        self.model = model
        self.config = cfg
        self.architecture = arch
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        self.rotary = inner.rotary_emb
        first = inner.layers[0].self_attn
        self.head_dim = first.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.scaling = first.scaling
        self.num_layers = len(inner.layers)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        self.layers: list[FusedLayer] = []
        on_huge_pages = self.device.type == "cpu" and ADVISABLE
        arena = HugePageArena(HugePageArena.size_for(model)) if on_huge_pages else None
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv_w, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], arena)
                gu_w, gu_b = _fuse([mlp.gate_proj, mlp.up_proj], arena)
                self.layers.append(
                    FusedLayer(
                        input_norm=layer.input_layernorm,
                        post_norm=layer.post_attention_layernorm,
                        qkv_weight=qkv_w,
                        qkv_bias=qkv_b,
                        q_norm=getattr(attn, "q_norm", None),
                        k_norm=getattr(attn, "k_norm", None),
                        o_proj=attn.o_proj,
                        gate_up_weight=gu_w,
                        gate_up_bias=gu_b,
                        down_proj=mlp.down_proj,
                        act=mlp.act_fn,
                    )
                )
            if arena is not None:
                arena.adopt(model)  # every other weight (embedding, norms, o_proj, down_proj) follows
        self.silu_gate = getattr(cfg, "hidden_act", None) == "silu"
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

    def rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, head_dim] for positions 0..n-1 from the model's own rotary embedding."""
        pos = torch.arange(n, device=self.device)[None]
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, pos)
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
        mmap ceiling: larger blocks are mapped fresh and unmapped on every call, and fresh pages
        are dear in a process hosting vLLM (45-80k faults per blend took this stage from 0.5-0.6 s
        to 0.9-1.2 s there; 40k cost nothing measurable in a bare process)."""
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


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm (every supported architecture's norm, eps in `variance_epsilon`) in one pass."""
    eps = getattr(norm, "variance_epsilon", None)
    return norm(x) if eps is None else rms_norm(x, norm.weight, eps)


def _linear_add(residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, out: torch.Tensor | None = None) -> torch.Tensor:
    """residual + linear(x), the add done by the GEMM itself (one pass over the output, no temporary)."""
    y = torch.addmm(residual, x, linear.weight.t(), out=out)
    return y if linear.bias is None else y.add_(linear.bias)


def model_fingerprint(model: nn.Module) -> str:
    """Identity of (architecture, config, weights, dtype) without hashing every byte.

    Each parameter contributes its name, shape, dtype and up to 4096 evenly strided values, so two
    checkpoints that differ anywhere meaningful (fine-tune, quantization, dtype) get different prints.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash", "use_cache"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]
