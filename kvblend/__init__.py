"""kvblend: fast RAG time-to-first-token from precomputed, blended chunk KV caches."""
import os

# torch's OpenMP threads (libgomp) spin ~300k iterations at each barrier before sleeping. On a CPU shared
# with another busy process (vLLM's worker, other jobs), a spinning thread holds the core its descheduled
# partner needs, and the blend runs several times slower. A short spin keeps the idle-machine speed and
# avoids that collapse (the sweep: docs/dev/performance.md). libgomp reads it when torch loads, so it is
# set before torch is imported; vLLM's processes, spawned later, inherit it. A value already set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "5000")

__all__ = ["BlendConfig", "GenerateResult", "KVBlend", "KVBlendConfig", "RequestStats"]
__version__ = "0.1.0"
_HOMES = {"KVBlend": "kvblend.api", "BlendConfig": "kvblend.config", "KVBlendConfig": "kvblend.config",
          "GenerateResult": "kvblend.results", "RequestStats": "kvblend.results"}


def __getattr__(name: str):
    """The public names, imported on first use: `import kvblend.engines.vllm` (in vLLM's worker) loads
    only what it needs, not the API and the model stack behind it."""
    if name not in _HOMES:
        raise AttributeError(f"module 'kvblend' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
