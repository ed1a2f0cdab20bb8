"""Method specs for comparisons: `full`, `reuse`, `blend` and blend variants.

A variant overrides blend settings inline: `blend[selection=query,query_weight=0.5]` or
`blend[check_layers=[1,2],check_ratios=[0.3,0.15]]`. Values are parsed as YAML scalars/lists.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from kvblend.config import BlendConfig
from kvblend.results import METHODS


@dataclass
class MethodSpec:
    name: str
    method: str
    config: BlendConfig | None = None


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += 1 if ch == "[" else -1 if ch == "]" else 0
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_methods(text: str, base: BlendConfig) -> list[MethodSpec]:
    """Parse a comma-separated method list; `full` is always evaluated first (it is the reference)."""
    specs = []
    for item in _split_top_level(text):
        name, _, body = item.partition("[")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} in {item!r}; choose from {METHODS}")
        config = base if name == "blend" else None
        if body:
            if name != "blend" or not body.endswith("]"):
                raise ValueError(f"bad method spec {item!r}: only blend takes [key=value,...] overrides")
            overrides = {}
            for kv in _split_top_level(body[:-1]):
                key, eq, value = kv.partition("=")
                if not eq:
                    raise ValueError(f"bad override {kv!r} in {item!r}: expected key=value")
                if key.strip() in ("chunk_context", "primer"):
                    raise ValueError(f"{key.strip()!r} in {item!r}: chunk encoding is set once per run (--chunk-context, --primer-file)")
                overrides[key.strip()] = yaml.safe_load(value)
            config = BlendConfig.model_validate({**base.model_dump(), **overrides})
        specs.append(MethodSpec(item, name, config))
    specs.sort(key=lambda s: s.method != "full")
    if not specs or specs[0].method != "full":
        specs.insert(0, MethodSpec("full", "full"))
    return specs
