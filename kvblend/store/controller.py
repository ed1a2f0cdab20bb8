"""The loading controller (CacheBlend §5.1): recompute as much as loading leaves time for.

With pipelined loading a layer costs max(load, compute). Loading the hit chunks takes
T_load = Σ bytes / bandwidth of the tier each came from (bandwidth measured on this process's
reads; a tier not yet read is measured by loading the first layer now), and a full prefill of the
prompt takes T_prefill (per-token speed measured once per model by a short forward). Choosing
r = max(r_min, T_load / T_prefill) spends on extra recompute, and so on quality, the time the
loads would cost anyway.
"""
from __future__ import annotations

import statistics
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass

import torch

from kvblend.config import BlendConfig
from kvblend.store.lazy import LazyChunk

CALIBRATION_TOKENS = 128


@dataclass
class RatioChoice:
    ratio: float
    load_s: float
    prefill_s: float
    tokens: int


class LoadingController:
    def __init__(self, min_ratio: float = 0.08):
        self.min_ratio = min_ratio
        self.history: deque[RatioChoice] = deque(maxlen=1000)
        self._per_token_s: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @torch.inference_mode()
    def prefill_seconds(self, adapter, n_tokens: int) -> float:
        """Estimated full-prefill time of n_tokens on this model (linear in n; measured once)."""
        if adapter not in self._per_token_s:
            ids = torch.zeros((1, CALIBRATION_TOKENS), dtype=torch.long, device=adapter.device)
            adapter.model(ids)  # warm-up
            t0 = time.perf_counter()
            adapter.model(ids)
            if adapter.device.type == "cuda":
                torch.cuda.synchronize(adapter.device)
            self._per_token_s[adapter] = (time.perf_counter() - t0) / CALIBRATION_TOKENS
        return self._per_token_s[adapter] * n_tokens

    @staticmethod
    def load_seconds(sources: list) -> float:
        """Time to read the lazily loaded sources from their tiers at the measured bandwidths."""
        total = 0.0
        for src in sources:
            if not isinstance(src, LazyChunk):
                continue  # already in memory
            if src.stats.bandwidth() is None:
                src.load_through(0)  # measures the tier; the blend needs the bytes anyway
            bandwidth = src.stats.bandwidth()
            total += src.nbytes / bandwidth if bandwidth else 0.0
        return total

    def resolve(self, cfg: BlendConfig, sources: list, n_tokens: int, adapter) -> BlendConfig:
        """cfg with a concrete recompute_ratio (unchanged unless it is "auto")."""
        if cfg.recompute_ratio != "auto":
            return cfg
        load_s = self.load_seconds(sources)
        prefill_s = self.prefill_seconds(adapter, n_tokens)
        ratio = min(1.0, max(self.min_ratio, load_s / prefill_s if prefill_s > 0 else 1.0))
        self.history.append(RatioChoice(ratio, load_s, prefill_s, n_tokens))
        return cfg.model_copy(update={"recompute_ratio": ratio})

    def summary(self) -> dict:
        if not self.history:
            return {"choices": 0, "min_ratio": self.min_ratio}
        return {"choices": len(self.history), "min_ratio": self.min_ratio, "last": asdict(self.history[-1]),
                "mean_ratio": statistics.fmean(c.ratio for c in self.history)}


_default = LoadingController()


def choose_recompute_ratio(store, cfg: BlendConfig, sources: list, n_tokens: int, adapter) -> BlendConfig:
    """Resolve recompute_ratio="auto" with the store's controller (a default one for plain stores)."""
    return getattr(store, "controller", _default).resolve(cfg, sources, n_tokens, adapter)
