"""Model loading: aliases for bundled models, and the layer-wise adapter over transformers."""
from kvblend.models.adapter import LayerwiseModel, SUPPORTED_ARCHITECTURES, UnsupportedModelError
from kvblend.models.registry import DTYPES, load_tokenizer, load_weights, pull_model, resolve_model, stop_token_ids

__all__ = ["LayerwiseModel", "SUPPORTED_ARCHITECTURES", "UnsupportedModelError", "DTYPES", "load_tokenizer", "load_weights", "pull_model",
           "resolve_model", "stop_token_ids"]
