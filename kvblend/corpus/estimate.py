"""What a precompute will cost before it runs: the store's size in every codec, and the time at a
speed measured here on a sample of the corpus's own chunks (what `kvblend precompute --dry-run` prints)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvblend.corpus.precompute import PlannedChunk, kv_bytes_per_token
from kvblend.store.codecs import CODECS

SAMPLE_TOKENS = 2048  # tokens encoded to measure the speed: a few chunks, seconds on a CPU


@dataclass(frozen=True)
class Estimate:
    total_tokens: int
    bytes_per_codec: dict[str, int]  # codec → whole store's bytes
    tokens_per_s: float | None  # one worker's measured encoding speed (None: not measured)
    workers: int

    @property
    def seconds(self) -> float | None:
        """Time to encode everything with `workers` workers at the measured speed each (ideal scaling)."""
        return self.total_tokens / (self.tokens_per_s * self.workers) if self.tokens_per_s else None


def store_bytes(config, dtype: str, total_tokens: int) -> dict[str, int]:
    """The store's KV bytes for `total_tokens` tokens in each codec (object headers left out: < 0.1%)."""
    return {codec: kv_bytes_per_token(config, dtype, codec) * total_tokens for codec in CODECS}


def sample(planned: list[PlannedChunk], budget: int = SAMPLE_TOKENS) -> list[PlannedChunk]:
    """The first chunks up to `budget` tokens (at least one, and at least two when there are: the
    first is a warm-up, left out of the timing)."""
    out, tokens = [], 0
    for p in planned:
        if len(out) >= 2 and tokens + p.tokens > budget:
            break
        out.append(p)
        tokens += p.tokens
    return out


def measure_tokens_per_s(encode: Callable[[list[str]], object], chunks: list[PlannedChunk]) -> float | None:
    """Tokens per second of `encode(texts)` over `chunks` after one warm-up chunk; None with fewer than two."""
    if len(chunks) < 2:
        return None
    encode([chunks[0].chunk.text])  # one-off costs: allocation, kernel selection
    timed = chunks[1:]
    t0 = time.perf_counter()
    encode([p.chunk.text for p in timed])
    return sum(p.tokens for p in timed) / (time.perf_counter() - t0)


def format_estimate(est: Estimate, chosen: str, size: Callable[[int], str]) -> list[str]:
    """Lines for the console: one size per codec (the chosen one marked) and the time."""
    lines = ["store size per codec: " + ", ".join(
        f"{codec} {size(n)}" + (" (chosen)" if codec == chosen else "") for codec, n in est.bytes_per_codec.items())]
    if est.seconds is None:
        lines.append("encoding speed not measured (fewer than two chunks)")
    else:
        workers = f" × {est.workers} workers (ideal scaling)" if est.workers > 1 else ""
        lines.append(f"estimated time {_duration(est.seconds)} at {est.tokens_per_s:,.0f} tok/s per worker "
                     f"(measured here){workers}")
    return lines


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
