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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvblend.blend.selection import budget, keep_top, keep_top_per_group, query_attention, rank_scores
from kvblend.config import BlendConfig
from kvblend.kernels import (
    AttentionPlan,
    kv_deviation,
    plan_attention,
    rope_realign,
    rope_realign_span,
    rotate,
    scatter_rows,
    selected_attention,
)
from kvblend.models.adapter import LayerwiseModel

REUSE = BlendConfig(recompute_ratio=0.0, check_layers=[])  # method "reuse": the cached KV as is, nothing recomputed


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


@dataclass
class BlendState:
    """One request's blend: what the prompt fixes, and what each layer carries to the next (the
    active positions with their hidden states and attention plan, the fused KV so far)."""

    ids: torch.Tensor
    spans: list[CachedSpan]
    cfg: BlendConfig
    checks: dict[int, float]  # check layer → ratio kept there
    is_cached: torch.Tensor  # [N] bool: the token's KV comes from a span
    sink: torch.Tensor  # [N] bool: a span's leading tokens, always recomputed
    cos: torch.Tensor
    sin: torch.Tensor
    question_start: int | None
    ranking: torch.Tensor | None  # [N] scores that replace the check layers' own (research: the eval's oracle)
    watch: Stopwatch
    group: int  # query heads per KV head
    generator: torch.Generator
    active: torch.Tensor = field(init=False)  # positions whose hidden states are carried
    h: torch.Tensor = field(init=False)  # [active, hidden]
    plan: AttentionPlan = field(init=False)
    q_cos: torch.Tensor = field(init=False)
    q_sin: torch.Tensor = field(init=False)
    keys: list[torch.Tensor] = field(default_factory=list)  # per finished layer [KV, N, D]
    values: list[torch.Tensor] = field(default_factory=list)
    selected: torch.Tensor | None = None  # cached positions recomputed after the last check layer
    question_mass: torch.Tensor | None = None  # [N] the look-ahead's attention from the question

    @property
    def n(self) -> int:
        return self.ids.numel()

    @property
    def n_cached(self) -> int:
        return int(self.is_cached.sum())

    def focus(self, active: torch.Tensor) -> None:
        """Carry `active` on: its attention plan and its queries' rotary tables, built once per set."""
        self.active = active
        self.plan = plan_attention(active, self.n, self.group, self.cfg.attention_block, self.cos.dtype)
        self.q_cos, self.q_sin = self.cos.index_select(0, active), self.sin.index_select(0, active)


class BlendExecutor:
    def __init__(self, adapter: LayerwiseModel, config: BlendConfig | None = None):
        self.m = adapter
        self.config = self._checked(config or BlendConfig())

    def _checked(self, cfg: BlendConfig) -> BlendConfig:
        if cfg.layers and cfg.layers[-1] >= self.m.num_layers:
            raise ValueError(f"check layer {cfg.layers[-1]} is past the model's {self.m.num_layers} layers")
        return cfg

    @torch.inference_mode()
    def run(
        self,
        ids: torch.Tensor,
        spans: list[CachedSpan],
        question_start: int | None = None,
        config: BlendConfig | None = None,
        profile: bool = False,
        ranking: torch.Tensor | None = None,
    ) -> BlendOutput:
        """Blend one prompt: ids [N] with cached spans (any order of hits and fresh text).

        `ranking` ([N], higher first) replaces the check layers' ranking of cached tokens: for
        research (kvblend.eval.oracle), not for requests."""
        if ranking is not None and ranking.shape != ids.shape:
            raise ValueError(f"ranking has shape {tuple(ranking.shape)}, the prompt {tuple(ids.shape)}")
        s = self._start(ids, spans, question_start, self._checked(config or self.config), profile, ranking)
        for i in range(self.m.num_layers):
            self._layer(s, i)
        return BlendOutput(s.keys, s.values, self.m.logits(s.h)[-1], s.selected, dict(s.watch.totals))

    def _start(self, ids, spans, question_start, cfg, profile, ranking=None) -> BlendState:
        """Check the request and set up its state: every token active before the first check layer
        (only the fresh ones when nothing is recomputed)."""
        m, n = self.m, ids.numel()
        self._check_length(n)
        spans = sorted(spans, key=lambda sp: sp.start)
        is_cached = _cached_mask(spans, n)
        sink = torch.zeros(n, dtype=torch.bool)
        for sp in spans:
            sink[sp.start : sp.start + min(cfg.sink_tokens, sp.kv.num_tokens)] = True
        cos, sin = m.rope_tables(n)
        s = BlendState(
            ids=ids.to(m.device), spans=spans, cfg=cfg, checks=cfg.checks(),
            is_cached=is_cached.to(m.device), sink=sink.to(m.device), cos=cos, sin=sin, question_start=question_start,
            ranking=None if ranking is None else ranking.float().cpu(),
            watch=Stopwatch(profile, m.device), group=m.num_heads // m.num_kv_heads,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        positions = torch.arange(n, device=m.device)
        reuse_only = not s.checks and cfg.recompute_ratio == 0.0
        if cfg.selection == "lookahead" and s.checks and s.ranking is None and s.n_cached:  # nothing cached: nothing to rank
            if question_start is None:
                raise ValueError('selection="lookahead" needs question_start (where the question begins)')
            with s.watch("lookahead"):
                s.question_mass = self._look_ahead(s)
        s.focus(positions[~s.is_cached] if reuse_only else positions)
        s.h = m.embed(s.ids)[s.active]
        return s

    def _check_length(self, n: int) -> None:
        m = self.m
        if n == 0:
            raise ValueError("empty prompt")
        if n > m.max_positions:
            raise ValueError(f"prompt of {n} tokens exceeds the model's context of {m.max_positions} positions")
        if m.sliding_window and n > m.sliding_window:
            raise ValueError(f"prompt of {n} tokens exceeds the model's sliding window of {m.sliding_window}")

    def _layer(self, s: BlendState, i: int) -> None:
        """Layer i: Q/K/V of the active tokens, the fused KV, a selection at a check layer, then
        attention and MLP for the tokens kept (only the last prompt token at the last layer)."""
        m, watch, backend = self.m, s.watch, s.cfg.backend
        with watch("qkv"):
            q, k, v = m.qkv(i, s.h)
        all_active = s.active.numel() == s.n
        keys, values = self._layer_kv(s, i, k, v, fused=not all_active or i in s.checks)
        keep = None
        if i in s.checks:
            with watch("select"):
                keep = self._select(s, s.checks[i], q, k, v, keys, values)
        if not all_active or i in s.checks:
            with watch("scatter"):
                rope_realign(k, s.cos, s.sin, s.active, out=keys, backend=backend)
                scatter_rows(v, values, s.active, backend=backend)
        s.keys.append(keys)
        s.values.append(values)
        if keep is not None:
            q, s.h = q[:, keep], s.h[keep]
            s.focus(s.active[keep])
        if i == m.num_layers - 1:
            q = self._last_token_only(s, q)
        with watch("attention"):
            attn = selected_attention(rotate(q, s.q_cos, s.q_sin), keys, values, s.plan, m.scaling, backend=backend)
        with watch("mlp"):
            s.h = m.mlp(i, m.attn_out(i, s.h, attn))

    def _layer_kv(self, s: BlendState, i: int, k: torch.Tensor, v: torch.Tensor, fused: bool):
        """Layer i's (keys, values) [KV, N, D]: the cached rows realigned when `fused` (fresh rows
        are scattered after), else every row fresh, rotated straight into place."""
        if fused:
            return self._fused_buffers(s, i, k)
        with s.watch("rope"):
            return rotate(k, s.cos, s.sin), v

    def _last_token_only(self, s: BlendState, q: torch.Tensor) -> torch.Tensor:
        """Record which cached tokens were recomputed and keep only the last prompt token (its
        output alone is needed); returns its queries."""
        s.selected = s.active[s.is_cached[s.active]]
        s.h = s.h[-1:]
        s.focus(s.active[-1:])
        return q[:, -1:]

    def _fused_buffers(self, s: BlendState, i: int, k_fresh: torch.Tensor):
        """Layer i's buffers with every cached row realigned (fresh rows are scattered after)."""
        kv_heads, d = k_fresh.shape[0], k_fresh.shape[2]
        keys = torch.empty((kv_heads, s.n, d), dtype=k_fresh.dtype, device=k_fresh.device)
        values = torch.empty_like(keys)
        for sp in s.spans:
            with s.watch("load"):
                ck, cv = sp.kv.layer(i)
                ck = ck.to(keys.device, keys.dtype, non_blocking=True)
                if s.cfg.cached_temperature != 1.0:
                    ck = ck / s.cfg.cached_temperature
                cv = cv.to(keys.device, keys.dtype, non_blocking=True)
            with s.watch("realign"):
                rope_realign_span(ck, s.cos, s.sin, sp.start, out=keys, backend=s.cfg.backend)
                values[:, sp.start : sp.end] = cv
        return keys, values

    def _look_ahead(self, s: BlendState) -> torch.Tensor:
        """[N] attention the question pays each position, summed over layers, in a pass of the fresh
        tokens over the cached KV as stored (what reuse computes)."""
        m, backend = self.m, s.cfg.backend
        fresh = (~s.is_cached).nonzero().squeeze(1)
        plan = plan_attention(fresh, s.n, s.group, s.cfg.attention_block, s.cos.dtype)
        f_cos, f_sin = s.cos.index_select(0, fresh), s.sin.index_select(0, fresh)
        asks = fresh >= s.question_start
        h = m.embed(s.ids)[fresh]
        mass = torch.zeros(s.n, device=m.device)
        for i in range(m.num_layers):
            q, k, v = m.qkv(i, h)
            keys, values = self._fused_buffers(s, i, k)
            rope_realign(k, s.cos, s.sin, fresh, out=keys, backend=backend)
            scatter_rows(v, values, fresh, backend=backend)
            q = rotate(q, f_cos, f_sin)
            mass += query_attention(q[:, asks], keys, fresh[asks], m.scaling)
            if i < m.num_layers - 1:
                h = m.mlp(i, m.attn_out(i, h, selected_attention(q, keys, values, plan, m.scaling, backend=backend)))
        return mass

    def _select(self, s: BlendState, ratio, q, k, v, keys, values) -> torch.Tensor:
        """Indices into `s.active` kept after this check layer: all fresh tokens + the best cached."""
        cfg, active, cos, sin = s.cfg, s.active, s.cos, s.sin
        cand = s.is_cached[active].nonzero().squeeze(1)  # indices into active
        pos = active[cand]
        deviation = cfg.deviation_kind
        if deviation == "none":
            dev = torch.ones(cand.numel(), device=cand.device)
        elif deviation == "v":
            dev = kv_deviation(v[:, cand], values[:, pos], backend=cfg.backend)
        else:
            fresh_k = rotate(k[:, cand], cos.index_select(0, pos), sin.index_select(0, pos))
            dev = kv_deviation(fresh_k, keys[:, pos], backend=cfg.backend)
            if deviation == "kv":
                dv = kv_deviation(v[:, cand], values[:, pos], backend=cfg.backend)
                dev = dev / dev.mean().clamp_min(1e-12) + dv / dv.mean().clamp_min(1e-12)
        attention = None
        if cfg.selection == "query" and s.question_start is not None:
            qmask = active >= s.question_start
            q_pos = active[qmask]
            q_rot = rotate(q[:, qmask], cos.index_select(0, q_pos), sin.index_select(0, q_pos))
            fused_k = keys.clone()
            rope_realign(k, cos, sin, active, out=fused_k, backend=cfg.backend)
            attention = query_attention(q_rot, fused_k, q_pos, self.m.scaling)[pos]
        elif s.question_mass is not None:
            attention = s.question_mass[pos]
        if s.ranking is not None:
            scores = s.ranking[pos.cpu()]
        else:
            scores = rank_scores(cfg, dev.cpu(), None if attention is None else attention.cpu(), s.generator)
        if cfg.per_chunk_budget:
            span_of = torch.bucketize(pos.cpu(), torch.tensor([sp.start for sp in s.spans]), right=True) - 1
            quota = [budget(ratio, sp.kv.num_tokens) for sp in s.spans]
            kept = keep_top_per_group(scores, s.sink[pos].cpu(), span_of, quota).to(cand.device)
        else:
            kept = keep_top(scores, s.sink[pos].cpu(), budget(ratio, s.n_cached)).to(cand.device)
        keep = torch.cat([(~s.is_cached[active]).nonzero().squeeze(1), cand[kept]])
        return keep.sort().values


def _cached_mask(spans: list[CachedSpan], n: int) -> torch.Tensor:
    """[N] bool of the positions spans (sorted by start) cover; they must not overlap, and the
    last prompt token must be fresh."""
    for a, b in zip(spans, spans[1:]):
        if a.end > b.start:
            raise ValueError(f"cached spans overlap at positions {b.start}..{a.end - 1}")
    is_cached = torch.zeros(n, dtype=torch.bool)
    for sp in spans:
        is_cached[sp.start : sp.end] = True
    if spans and (spans[-1].end > n or is_cached[-1]):
        raise ValueError("the last prompt token must be fresh (end the prompt with the question)")
    return is_cached
