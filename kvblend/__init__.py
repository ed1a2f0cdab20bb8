"""kvblend: fast RAG time-to-first-token from precomputed, blended chunk KV caches."""
from kvblend.api import GenerateResult, KVBlend, RequestStats
from kvblend.config import BlendConfig, KVBlendConfig

__all__ = ["BlendConfig", "GenerateResult", "KVBlend", "KVBlendConfig", "RequestStats"]
__version__ = "0.1.0"
