"""What a request produces, shared by the API, the engines and the eval loop (no imports of either)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import torch

Method = Literal["full", "reuse", "blend", "prefix"]
PREFILL_METHODS = ("full", "reuse", "blend")  # what kvblend's own prefill runs
METHODS = PREFILL_METHODS + ("prefix",)  # prefix: the decoding engine's own prefix caching (vLLM)


@dataclass
class RequestStats:
    method: str
    tokens_total: int = 0
    tokens_cached: int = 0
    tokens_recomputed: int = 0
    chunk_hits: int = 0
    chunk_misses: int = 0
    # share of cached tokens recomputed (0 for reuse, None for full); chosen per request when "auto"
    recompute_ratio: float | None = None
    ttft_s: float = 0.0
    decode_s: float = 0.0
    # prompt tokens the decoding engine did not compute itself (vLLM: the blend's KV, or its prefix cache)
    engine_cached_tokens: int = 0
    stages_s: dict[str, float] = field(default_factory=dict)
    # per chunk, in prompt order: its stored KV was used (not missing, not recomputed after a failed read)
    reused: list[bool] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def count_blend(self, spans: Sequence, found: Sequence[bool], recomputed: int) -> None:
        """Record a blend's counts: `spans` the cached chunks it used (each `.kv` a layer source),
        `found` per chunk in prompt order whether the store had it, `recomputed` its recomputed cached
        tokens. A stored chunk whose layer failed its check (or whose tier went away mid-read) was
        recomputed, not reused."""
        self.tokens_cached = sum(s.kv.num_tokens for s in spans)
        self.tokens_recomputed = recomputed
        failed = iter([bool(getattr(s.kv, "failed", False)) for s in spans])
        self.reused = [hit and not next(failed) for hit in found]
        self.chunk_hits = sum(self.reused)
        self.chunk_misses = len(found) - self.chunk_hits


@dataclass
class Prefill:
    """A prompt's KV for every layer plus its last-token logits: what decoding starts from."""

    ids: torch.Tensor
    cache: object  # transformers DynamicCache
    logits: torch.Tensor
    stats: RequestStats


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    ttft_s: float
    stats: RequestStats
    prefill: Prefill | None = None  # kept only when asked for (keep_prefill=True): the eval loop's KL needs it


@dataclass
class TokenEvent:
    """New tokens of request `index` (of a batch), as an engine produces them."""

    index: int
    stats: RequestStats
    tokens: list[int]
    prefill: Prefill | None = None
