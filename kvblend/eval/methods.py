"""Method specs for comparisons: `full`, `reuse`, `blend` and blend variants.

A variant overrides blend settings inline: `blend[selection=query,query_weight=0.5]` or
`blend[check_layers=[1,2],check_ratios=[0.3,0.15]]`. Values are parsed as YAML scalars/lists.
`oracle-kv` and `oracle-out` (research, kvblend.eval.oracle) are blends whose ranking of cached
tokens comes from full prefill; they take the same overrides (`oracle-out[recompute_ratio=0.3]`).
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from kvblend.config import BlendConfig
from kvblend.eval.oracle import ORACLES
from kvblend.results import METHODS

ORACLE_METHODS = {f"oracle-{kind}": kind for kind in ORACLES}


@dataclass
class MethodSpec:
    name: str
    method: str
    config: BlendConfig | None = None
    oracle: str | None = None  # the oracle ranking this blend uses (kvblend.eval.oracle)


def split_top_level(text: str, sep: str = ",") -> list[str]:
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
    for item in split_top_level(text):
        name, _, body = item.partition("[")
        oracle = ORACLE_METHODS.get(name)
        if oracle:
            name = "blend"
        elif name not in METHODS:
            raise ValueError(f"unknown method {name!r} in {item!r}; choose from {METHODS + tuple(ORACLE_METHODS)}")
        config = base if name == "blend" else None
        if body:
            if name != "blend" or not body.endswith("]"):
                raise ValueError(f"bad method spec {item!r}: only blend takes [key=value,...] overrides")
            overrides = {}
            for kv in split_top_level(body[:-1]):
                key, eq, value = kv.partition("=")
                if not eq:
                    raise ValueError(f"bad override {kv!r} in {item!r}: expected key=value")
                if key.strip() in ("chunk_context", "primer"):
                    raise ValueError(f"{key.strip()!r} in {item!r}: chunk encoding is set once per run (--chunk-context, --primer-file)")
                overrides[key.strip()] = yaml.safe_load(value)
            config = BlendConfig.model_validate({**base.model_dump(), **overrides})
        specs.append(MethodSpec(item, name, config, oracle))
    specs.sort(key=lambda s: s.method != "full")
    if not specs or specs[0].method != "full":
        specs.insert(0, MethodSpec("full", "full"))
    return specs
