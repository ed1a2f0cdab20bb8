"""kvblend's vLLM plugin: the `kvblend` load format, which lets kvblend code in vLLM's worker reach
the model vLLM loaded there.

vLLM runs every `vllm.general_plugins` entry point in each of its processes (API server, engine
core, workers) before the model loads; kvblend's (pyproject.toml) is `register`, which registers
`KVBlendModelLoader` under the load format `kvblend` with vLLM's public
`register_model_loader`. With `load_format="kvblend"` (`vllm serve --load-format kvblend`) the
worker loads the model through it: vLLM's default loader does all the loading, and the loader
records the model it returns. `worker_model()` then gives, in that worker process, a
`VllmLayerwiseModel` over it. Nothing in vLLM is patched.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from kvblend.engines.vllm_model import VllmLayerwiseModel

LOAD_FORMAT = "kvblend"
INNER_LOAD_FORMAT = "auto"  # what vLLM's default loader is asked to read (safetensors, else .bin / .pt)


@dataclasses.dataclass
class _Loaded:
    model: nn.Module
    checkpoint: str
    lora: bool
    adapter: Any = None


_loaded: _Loaded | None = None  # the model this process loaded through the kvblend format
_registered = False


def register() -> None:
    """The `vllm.general_plugins` entry point: register the `kvblend` load format (idempotent, as
    vLLM asks of plugins, which it may load more than once)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import BaseModelLoader, get_model_loader, register_model_loader

    @register_model_loader(LOAD_FORMAT)
    class KVBlendModelLoader(BaseModelLoader):
        """vLLM's default loader (load format `auto`), recording the model it loads in this process."""

        def __init__(self, load_config) -> None:
            super().__init__(load_config)
            self.inner = get_model_loader(dataclasses.replace(load_config, load_format=INNER_LOAD_FORMAT))

        def download_model(self, model_config) -> None:
            self.inner.download_model(model_config)

        def load_weights(self, model: nn.Module, model_config) -> None:
            self.inner.load_weights(model, model_config)

        def load_model(self, vllm_config, model_config, prefix: str = "") -> nn.Module:
            model = self.inner.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            if model_config is vllm_config.model_config and not prefix:  # the served model, not a draft model
                _record(model, model_config.model, vllm_config.lora_config is not None)
            return model

    _registered = True


def _record(model: nn.Module, checkpoint: str, lora: bool) -> None:
    global _loaded
    _loaded = _Loaded(model, checkpoint, lora)


def worker_model() -> "VllmLayerwiseModel":
    """The layer-wise view of the model vLLM loaded in this process through the `kvblend` load format
    (built on first call). RuntimeError outside such a worker, or with LoRA (whose adapters the base
    modules alone do not apply)."""
    from kvblend.engines.vllm_model import VllmLayerwiseModel

    if _loaded is None:
        raise RuntimeError(f"no model was loaded in this process with load_format={LOAD_FORMAT!r}: start vLLM "
                           f"with it (vllm serve --load-format {LOAD_FORMAT}); this is for vLLM's worker processes")
    if _loaded.lora:
        raise RuntimeError("the in-worker blend does not apply LoRA adapters: start vLLM without LoRA")
    if _loaded.adapter is None:
        _loaded.adapter = VllmLayerwiseModel(_loaded.model, _loaded.checkpoint)
    return _loaded.adapter
