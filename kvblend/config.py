"""The one configuration object.

`KVBlendConfig` gathers everything a `KVBlend` instance needs; `BlendConfig` holds the knobs of
the blending step itself. Both validate on construction, so a bad value fails where it is set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator


def kvblend_home() -> Path:
    """Where models and default stores live (`$KVBLEND_HOME`, default `~/.cache/kvblend`)."""
    return Path(os.environ.get("KVBLEND_HOME", Path.home() / ".cache" / "kvblend")).expanduser()


class BlendConfig(BaseModel):
    """How the blend chooses which cached tokens to recompute.

    `recompute_ratio` is the share of cached tokens recomputed after the last check layer.
    `check_ratios` (one per check layer, non-increasing, ending at `recompute_ratio`) enables
    gradual filtering. `selection` picks the ranking: CacheBlend's KV deviation, deviation
    weighted by the attention the question pays each token (`"query"`), or random (an ablation).
    """

    model_config = {"extra": "forbid"}

    recompute_ratio: float = Field(0.15, ge=0.0, le=1.0)
    check_layers: list[int] = Field(default_factory=lambda: [1])
    check_ratios: list[float] | None = None
    deviation: Literal["v", "k", "kv"] = "v"
    selection: Literal["deviation", "query", "random"] = "deviation"
    query_weight: float = Field(1.0, ge=0.0, description="mix of the query-attention score, for selection='query'")
    sink_tokens: int = Field(0, ge=0, description="leading tokens of each cached chunk always recomputed")
    chunk_context: Literal["bos", "none"] | list[int] = "bos"
    attention_block: int = Field(128, ge=1, description="selected queries per attention block")
    backend: Literal["auto", "torch", "triton"] = "auto"
    seed: int = 0

    @field_validator("check_layers")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if any(layer < 0 for layer in v):
            raise ValueError(f"check_layers must be >= 0, got {v}")
        if sorted(set(v)) != v:
            raise ValueError(f"check_layers must be strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _ratios(self) -> "BlendConfig":
        if self.check_ratios is not None:
            r = self.check_ratios
            if len(r) != len(self.check_layers):
                raise ValueError(f"check_ratios {r} needs one ratio per check layer {self.check_layers}")
            if any(b > a for a, b in zip(r, r[1:])) or any(not 0 <= x <= 1 for x in r):
                raise ValueError(f"check_ratios must be in [0, 1] and non-increasing, got {r}")
            if abs(r[-1] - self.recompute_ratio) > 1e-12:
                raise ValueError(f"the last check ratio {r[-1]} must equal recompute_ratio {self.recompute_ratio}")
        if not self.check_layers and self.recompute_ratio not in (0.0, 1.0):
            raise ValueError("a recompute_ratio strictly between 0 and 1 needs at least one check layer")
        return self

    def ratios(self) -> list[float]:
        """The ratio kept at each check layer."""
        return list(self.check_ratios) if self.check_ratios else [self.recompute_ratio] * len(self.check_layers)


class KVBlendConfig(BaseModel):
    """Everything one `KVBlend` instance needs."""

    model_config = {"extra": "forbid"}

    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    store: str | None = Field(None, description="store directory; None keeps caches in memory only")
    threads: int | None = Field(None, description="torch CPU threads; None keeps torch's default")
    blend: BlendConfig = Field(default_factory=BlendConfig)
