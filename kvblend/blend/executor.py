"""The layer-wise blend executor (CacheBlend, with exact masking and non-prefix reuse).

Per layer, the fused KV buffer holds, at row p, the KV of the token at absolute position p:
cached rows are realigned from the store (position-free keys rotated to p), and every token
still "active" overwrites its row with freshly computed K/V. Layers before the first check layer
run all tokens. A check layer ranks the active cached tokens (KV deviation, optionally weighted
by the question's attention) and keeps the top ceil(r·N_cached) plus every fresh token; from then
on only those are computed, attending to the whole fused buffer under an exact position mask.
The last prompt token is always fresh, so its logits come out of the blend itself.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvblend.blend.selection import budget, keep_top, query_attention, rank_scores
from kvblend.config import BlendConfig
from kvblend.kernels import (
    kv_deviation,
    plan_attention,
    rope_realign,
    rope_realign_span,
    rotate,
    rotate_into,
    scatter_rows,
    selected_attention,
)
from kvblend.models.adapter import LayerwiseModel


class LayerSource(Protocol):
    """A chunk's cached KV, read one layer at a time (may fetch lazily)."""

    num_tokens: int

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class CachedSpan:
    """A cached chunk placed at absolute positions start .. start+num_tokens-1."""

    start: int
    kv: LayerSource

    @property
    def end(self) -> int:
        return self.start + self.kv.num_tokens


@dataclass
class BlendOutput:
    keys: list[torch.Tensor]  # per layer [KV, N, D], rotated at absolute positions
    values: list[torch.Tensor]
    logits: torch.Tensor  # [vocab] float32, the last prompt token
    selected: torch.Tensor  # positions of the cached tokens recomputed after the last check layer
    timings: dict[str, float] = field(default_factory=dict)


class Stopwatch:
    """Accumulates wall time per stage (synchronising CUDA so times are honest) when enabled."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.sync = enabled and device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.totals[stage] += time.perf_counter() - t


class BlendExecutor:
    def __init__(self, adapter: LayerwiseModel, config: BlendConfig | None = None):
        self.m = adapter
        self.config = self._checked(config or BlendConfig())

    def _checked(self, cfg: BlendConfig) -> BlendConfig:
        if cfg.check_layers and cfg.check_layers[-1] >= self.m.num_layers:
            raise ValueError(f"check layer {cfg.check_layers[-1]} is past the model's {self.m.num_layers} layers")
        return cfg

    @torch.inference_mode()
    def run(
        self,
        ids: torch.Tensor,
        spans: list[CachedSpan],
        question_start: int | None = None,
        config: BlendConfig | None = None,
        profile: bool = False,
        kv_out: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> BlendOutput:
        """Blend one prompt: ids [N] with cached spans (any order of hits and fresh text).

        `kv_out` gives each layer's (keys, values) destination [KV, N, D] (e.g. views into a
        hand-off file) in place of fresh buffers."""
        cfg = self._checked(config or self.config)
        m, dev = self.m, self.m.device
        n = ids.numel()
        if n == 0:
            raise ValueError("empty prompt")
        if n > m.max_positions:
            raise ValueError(f"prompt of {n} tokens exceeds the model's context of {m.max_positions} positions")
        if m.sliding_window and n > m.sliding_window:
            raise ValueError(f"prompt of {n} tokens exceeds the model's sliding window of {m.sliding_window}")
        spans = sorted(spans, key=lambda s: s.start)
        is_cached = torch.zeros(n, dtype=torch.bool)
        for a, b in zip(spans, spans[1:]):
            if a.end > b.start:
                raise ValueError(f"cached spans overlap at positions {b.start}..{a.end - 1}")
        for s in spans:
            is_cached[s.start : s.end] = True
        if spans and (spans[-1].end > n or is_cached[-1]):
            raise ValueError("the last prompt token must be fresh (end the prompt with the question)")
        if kv_out is not None:
            self._check_destinations(kv_out, n)
        is_cached = is_cached.to(dev)
        n_cached = int(is_cached.sum())
        watch = Stopwatch(profile, dev)
        cos, sin = m.rope_tables(n)
        generator = torch.Generator().manual_seed(cfg.seed)
        positions = torch.arange(n, device=dev)
        sink = torch.zeros(n, dtype=torch.bool, device=dev)
        for s in spans:
            sink[s.start : s.start + min(cfg.sink_tokens, s.kv.num_tokens)] = True

        checks = dict(zip(cfg.check_layers, cfg.ratios()))
        active = positions  # positions whose hidden states are carried
        if not checks and cfg.recompute_ratio == 0.0:
            active = positions[~is_cached]
        group = m.num_heads // m.num_kv_heads

        def plan_for(at: torch.Tensor):
            """Attention plan and the queries' rotary tables: built once per set of active positions."""
            return plan_attention(at, n, group, cfg.attention_block, m.dtype), cos.index_select(0, at), sin.index_select(0, at)

        plan, q_cos, q_sin = plan_for(active)
        h = m.embed(ids.to(dev))[active]
        keys_out, values_out = [], []
        for i in range(m.num_layers):
            with watch("qkv"):
                q, k, v = m.qkv(i, h)
            all_active = active.numel() == n
            out = None if kv_out is None else kv_out[i]
            if all_active and i not in checks:
                with watch("rope"):
                    if out is None:
                        keys, values = rotate(k, cos[:n], sin[:n]), v
                    else:
                        keys, values = rotate_into(k, cos[:n], sin[:n], out[0]), out[1].copy_(v)
            else:
                keys, values = self._fused_buffers(i, spans, n, cos, sin, k, cfg.backend, watch, out)
            keep = None
            if i in checks:
                with watch("select"):
                    keep = self._select(cfg, checks[i], n_cached, active, is_cached, sink, q, k, v, keys, values, question_start, cos, sin, generator)
            if not all_active or i in checks:
                with watch("scatter"):
                    rope_realign(k, cos, sin, active, out=keys, backend=cfg.backend)
                    scatter_rows(v, values, active, backend=cfg.backend)
            keys_out.append(keys)
            values_out.append(values)
            if keep is not None:
                q, h, active = q[:, keep], h[keep], active[keep]
                plan, q_cos, q_sin = plan_for(active)
            if i == m.num_layers - 1:
                active_before_last = active
                h = h[-1:]  # only the last prompt token's output is needed
                q = q[:, -1:]
                plan, q_cos, q_sin = plan_for(active[-1:])
            with watch("attention"):
                q_rot = rotate(q, q_cos, q_sin)
                attn = selected_attention(q_rot, keys, values, plan, m.scaling, backend=cfg.backend)
            with watch("mlp"):
                h = m.mlp(i, m.attn_out(i, h, attn))
        logits = m.logits(h)[-1]
        selected = active_before_last[is_cached[active_before_last]]
        return BlendOutput(keys_out, values_out, logits, selected, dict(watch.totals))

    def _check_destinations(self, kv_out, n):
        m = self.m
        want = (m.num_kv_heads, n, m.head_dim)
        if len(kv_out) != m.num_layers:
            raise ValueError(f"kv_out has {len(kv_out)} layers, the model {m.num_layers}")
        for i, pair in enumerate(kv_out):
            for t in pair:
                if tuple(t.shape) != want or t.dtype != m.dtype or t.device != m.device:
                    raise ValueError(f"kv_out layer {i}: {tuple(t.shape)} {t.dtype} on {t.device}, "
                                     f"expected {want} {m.dtype} on {m.device}")

    def _fused_buffers(self, i, spans, n, cos, sin, k_fresh, backend, watch, out=None):
        """Layer i's buffers (`out` or fresh) with every cached row realigned (fresh rows are scattered after)."""
        if out is None:
            kv_heads, d = k_fresh.shape[0], k_fresh.shape[2]
            keys = torch.empty((kv_heads, n, d), dtype=k_fresh.dtype, device=k_fresh.device)
            values = torch.empty_like(keys)
        else:
            keys, values = out
        for s in spans:
            with watch("load"):
                ck, cv = s.kv.layer(i)
                ck = ck.to(keys.device, keys.dtype, non_blocking=True)
                cv = cv.to(keys.device, keys.dtype, non_blocking=True)
            with watch("realign"):
                rope_realign_span(ck, cos, sin, s.start, out=keys, backend=backend)
                values[:, s.start : s.end] = cv
        return keys, values

    def _select(self, cfg, ratio, n_cached, active, is_cached, sink, q, k, v, keys, values, question_start, cos, sin, generator):
        """Indices into `active` kept after this check layer: all fresh tokens + the best cached."""
        cand = is_cached[active].nonzero().squeeze(1)  # indices into active
        pos = active[cand]
        if cfg.deviation == "v":
            dev = kv_deviation(v[:, cand], values[:, pos], backend=cfg.backend)
        else:
            fresh_k = rotate(k[:, cand], cos.index_select(0, pos), sin.index_select(0, pos))
            dev = kv_deviation(fresh_k, keys[:, pos], backend=cfg.backend)
            if cfg.deviation == "kv":
                dv = kv_deviation(v[:, cand], values[:, pos], backend=cfg.backend)
                dev = dev / dev.mean().clamp_min(1e-12) + dv / dv.mean().clamp_min(1e-12)
        attention = None
        if cfg.selection == "query" and question_start is not None:
            qmask = active >= question_start
            q_pos = active[qmask]
            q_rot = rotate(q[:, qmask], cos.index_select(0, q_pos), sin.index_select(0, q_pos))
            fused_k = keys.clone()
            rope_realign(k, cos, sin, active, out=fused_k, backend=cfg.backend)
            attention = query_attention(q_rot, fused_k, q_pos, self.m.scaling)[pos]
        scores = rank_scores(cfg, dev.cpu(), None if attention is None else attention.cpu(), generator)
        kept = keep_top(scores, sink[pos].cpu(), budget(ratio, n_cached)).to(cand.device)
        keep = torch.cat([(~is_cached[active]).nonzero().squeeze(1), cand[kept]])
        return keep.sort().values
