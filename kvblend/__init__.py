"""kvblend: fast RAG time-to-first-token from precomputed, blended chunk KV caches."""
import os

# torch's OpenMP threads (libgomp) spin ~300k iterations at each barrier before sleeping. On a CPU shared
# with another busy process (vLLM's worker, other jobs), a spinning thread holds the core its descheduled
# partner needs, and the blend runs several times slower (docs/vllm.md, "Threads"). 5000 measured as fast
# as the default on an idle machine and within ~10% of the shortest spin beside a busy core. Read by
# libgomp when torch loads, so set before the import below; vLLM's processes, spawned later, inherit it.
os.environ.setdefault("GOMP_SPINCOUNT", "5000")

from kvblend.api import GenerateResult, KVBlend, RequestStats  # noqa: E402
from kvblend.config import BlendConfig, KVBlendConfig  # noqa: E402

__all__ = ["BlendConfig", "GenerateResult", "KVBlend", "KVBlendConfig", "RequestStats"]
__version__ = "0.1.0"
