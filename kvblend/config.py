"""The one configuration object.

`KVBlendConfig` gathers everything a `KVBlend` instance needs; `BlendConfig` holds the knobs of
the blending step itself. Both validate on construction, so a bad value fails where it is set.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator


def kvblend_home() -> Path:
    """Where models and default stores live (`$KVBLEND_HOME`, default `~/.cache/kvblend`)."""
    return Path(os.environ.get("KVBLEND_HOME", Path.home() / ".cache" / "kvblend")).expanduser()


class BlendConfig(BaseModel):
    """How the blend chooses which cached tokens to recompute.

    `recompute_ratio` is the share of cached tokens recomputed after the last check layer, or
    "auto": the store's loading controller picks it per request so recompute hides loading.
    `selection` picks the ranking: by default (`"lookahead"`, as ProphetKV) the attention the
    question pays each cached token over every layer, in a pass of the fresh tokens over the reused
    KV before the blend; with `deviation="none"` that attention alone ranks, so the choice is made
    at layer 0 and no layer runs every token. CacheBlend's ranking is `selection="deviation"`,
    `deviation="v"`, `check_layers=[1]`: how far each token's fresh V strays from its cached V at
    the check layer. `"query"` weights that deviation by the question's attention at the check
    layer; `"random"` is an ablation. `check_ratios` (one per check layer, non-increasing, ending
    at `recompute_ratio`) enables gradual filtering. `cached_temperature` (APE) divides the
    attention logits of the cached rows left as stored.
    `chunk_context` is what each chunk is encoded after (not stored): `"primed"` (default: the
    prompt's template head, a passage and the separator, so each chunk is encoded as if it followed
    another document, as all but the first retrieved chunk do), the model's BOS, `"head"` or nothing.
    `primer` is that passage: `kvblend precompute` picks the most typical passage of the corpus and
    records it beside the store, which every reader of the store then uses; unset, a neutral passage.
    Why these defaults: docs/benchmarks.md, Blend quality per unit of speed.
    """

    model_config = {"extra": "forbid"}

    recompute_ratio: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = 0.08
    check_layers: list[int] | None = Field(None, description="unset: [0] when deviation is 'none', else [1]")
    check_ratios: list[float] | None = None
    deviation: Literal["v", "k", "kv", "none"] | None = Field(None, description="unset: 'none' for lookahead, else 'v'")
    selection: Literal["deviation", "query", "lookahead", "random"] = "lookahead"
    query_weight: float = Field(1.0, ge=0.0, description="mix of the question-attention score, for selection='query' or 'lookahead'")
    sink_tokens: int = Field(0, ge=0, description="leading tokens of each cached chunk always recomputed")
    per_chunk_budget: bool = Field(False, description=(
        "each cached chunk recomputes its own share of its tokens, instead of the best share of all cached tokens"))
    cached_temperature: float = Field(1.0, gt=0.0, description=(
        "attention temperature of the cached rows a layer does not recompute (APE): their keys are divided by it"))
    chunk_context: Literal["bos", "head", "primed", "none"] | list[int] = "primed"
    primer: str | None = Field(None, min_length=1, description=(
        "the passage 'primed' chunks are encoded after; best one of the corpus's own (default: a neutral passage)"))
    attention_block: int = Field(128, ge=1, description="selected queries per attention block")
    backend: Literal["auto", "torch", "triton"] = "auto"
    seed: int = 0

    @field_validator("check_layers")
    @classmethod
    def _sorted_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(layer < 0 for layer in v):
            raise ValueError(f"check_layers must be >= 0, got {v}")
        if sorted(set(v)) != v:
            raise ValueError(f"check_layers must be strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _primer(self) -> "BlendConfig":
        if self.primer is not None and self.chunk_context != "primed":
            raise ValueError(f'a primer is only used with chunk_context="primed" (got {self.chunk_context!r})')
        return self

    @model_validator(mode="after")
    def _ranking(self) -> "BlendConfig":
        if self.deviation_kind == "none" and self.selection not in ("query", "lookahead"):
            raise ValueError(f'deviation="none" ranks by the question\'s attention alone: it needs selection="query" '
                             f'or "lookahead" (got {self.selection!r})')
        return self

    @property
    def deviation_kind(self) -> str:
        """`deviation`, or unset: none for the look-ahead (its attention ranks alone), else V."""
        if self.deviation is not None:
            return self.deviation
        return "none" if self.selection == "lookahead" else "v"

    @property
    def layers(self) -> list[int]:
        """`check_layers`, or unset: layer 0 when nothing deviates (no layer need run every token), else layer 1."""
        if self.check_layers is not None:
            return self.check_layers
        return [0] if self.deviation_kind == "none" else [1]

    @model_validator(mode="after")
    def _ratios(self) -> "BlendConfig":
        if self.recompute_ratio == "auto":
            if self.check_ratios is not None or not self.layers:
                raise ValueError('recompute_ratio="auto" needs check layers and no check_ratios')
            return self
        if self.check_ratios is not None:
            r = self.check_ratios
            if len(r) != len(self.layers):
                raise ValueError(f"check_ratios {r} needs one ratio per check layer {self.layers}")
            if any(b > a for a, b in zip(r, r[1:])) or any(not 0 <= x <= 1 for x in r):
                raise ValueError(f"check_ratios must be in [0, 1] and non-increasing, got {r}")
            if abs(r[-1] - self.recompute_ratio) > 1e-12:
                raise ValueError(f"the last check ratio {r[-1]} must equal recompute_ratio {self.recompute_ratio}")
        if not self.layers and self.recompute_ratio not in (0.0, 1.0):
            raise ValueError("a recompute_ratio strictly between 0 and 1 needs at least one check layer")
        return self

    def checks(self) -> dict[int, float]:
        """Check layer → the ratio kept there."""
        layers = self.layers
        return dict(zip(layers, self.check_ratios or [self.recompute_ratio] * len(layers)))


_SIZE = re.compile(r"^\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_bytes(value: Any) -> Any:
    """'512MiB', '2GB', '1e9' or an int → bytes; anything else is left for pydantic to reject."""
    if isinstance(value, str) and (m := _SIZE.match(value)) and m.group(2).lower() in _UNITS:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    return value


ByteSize = Annotated[int, Field(ge=0)]
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://", "valkey://")  # what a remote tier's URL may start with
PERSISTENT_CODEC = "int8"  # the default codec of disk and remote tiers (StoreConfig; why: docs/benchmarks.md, Codecs)


class StoreConfig(BaseModel):
    """The tiered KV store: which tiers exist, their byte caps, the codec and loading.

    Tiers, fastest first: GPU (only with CUDA; 0 bytes disables it), CPU memory, a local disk
    directory, a shared Redis/Valkey (`redis://host:port/db`). Unset fields come from
    `KVBLEND_<FIELD>` environment variables (`KVBLEND_CPU_BYTES=2GiB`, `KVBLEND_DISK_DIR=...`).
    Serialized tiers (disk, remote) hold objects in `codec`; memory tiers hold them as decoded,
    so every tier serves the same values. Left unset, `codec` is PERSISTENT_CODEC when a disk or
    remote tier is configured (compact objects, quality cost within noise: docs/benchmarks.md,
    Codecs) and raw for memory alone (nothing to save). A tier serves only objects in the
    configured codec. The remote tier's cap is the server's `maxmemory`.
    """

    model_config = {"extra": "forbid"}

    gpu_bytes: ByteSize = 0
    cpu_bytes: ByteSize = 4 * 2**30
    disk_dir: str | None = None
    disk_bytes: ByteSize | None = Field(None, description="disk tier cap; None: unbounded")
    disk_mmap: bool = Field(True, description="read raw disk objects through a map of the file (no copy; a file "
                            "truncated in place while mapped kills the reader, which kvblend's own writes never do)")
    remote_url: str | None = None
    codec: Literal["raw", "fp8", "int8", "int4"] = "raw"
    async_writes: bool = Field(True, description="write disk/remote tiers on a background thread")
    prefetch_layers: int = Field(2, ge=0, description="layers read ahead of the blend; 0: load on demand")
    min_recompute_ratio: float = Field(0.08, ge=0.0, le=1.0, description='floor of recompute_ratio="auto" (the default ratio)')
    remote_retry_s: float = Field(2.0, gt=0, description="wait before retrying a remote tier that failed")

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        env = {name: os.environ[f"KVBLEND_{name.upper()}"] for name in cls.model_fields if f"KVBLEND_{name.upper()}" in os.environ}
        return {**env, **data}

    @property
    def persistent(self) -> bool:
        """It has a disk or remote tier: one that outlives this process and that other processes
        (vLLM's worker, Ray tasks) can open."""
        return bool(self.disk_dir or self.remote_url)

    @model_validator(mode="after")
    def _persistent_codec(self) -> "StoreConfig":
        if "codec" not in self.model_fields_set and self.persistent:
            self.codec = PERSISTENT_CODEC
        return self

    @field_validator("gpu_bytes", "cpu_bytes", "disk_bytes", mode="before")
    @classmethod
    def _sizes(cls, v: Any) -> Any:
        return parse_bytes(v)

    @field_validator("remote_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(REMOTE_SCHEMES):
            raise ValueError(f"remote_url {v!r} must look like redis://host:port/db")
        return v

    @classmethod
    def from_spec(cls, spec: "str | StoreConfig | None") -> "StoreConfig":
        """A YAML file (`store:` section or the fields), a redis:// URL, or a disk directory."""
        if isinstance(spec, StoreConfig):
            return spec
        if spec is None:
            return cls()
        if spec.endswith((".yaml", ".yml")):
            try:
                data = yaml.safe_load(Path(spec).expanduser().read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ValueError(f"store config {spec}: {exc}") from exc
            data = data.get("store", data) if isinstance(data, dict) else data
            if not isinstance(data, dict):
                raise ValueError(f"store config {spec}: expected a mapping of store fields")
            return cls(**data)
        if "://" in spec:
            return cls(remote_url=spec)
        return cls(disk_dir=spec)


class KVBlendConfig(BaseModel):
    """Everything one `KVBlend` instance needs."""

    model_config = {"extra": "forbid", "validate_assignment": True}

    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    store: StoreConfig = Field(default_factory=StoreConfig, description="a StoreConfig, or a directory / redis:// URL / YAML file")
    threads: int | None = Field(None, description="torch CPU threads; None keeps torch's default")
    blend: BlendConfig = Field(default_factory=BlendConfig)

    @field_validator("store", mode="before")
    @classmethod
    def _store_spec(cls, v: Any) -> Any:
        return StoreConfig.from_spec(v) if v is None or isinstance(v, str) else v
