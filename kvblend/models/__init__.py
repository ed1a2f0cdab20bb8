"""Model loading: aliases for bundled models, and the layer-wise adapter over transformers."""
from kvblend.models.adapter import LayerwiseModel, SUPPORTED_ARCHITECTURES, UnsupportedModelError
from kvblend.models.registry import load_model, pull_model, resolve_model

__all__ = ["LayerwiseModel", "SUPPORTED_ARCHITECTURES", "UnsupportedModelError", "load_model", "pull_model", "resolve_model"]
