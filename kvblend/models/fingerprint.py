"""A model's identity for cache keys: architecture, config and every byte of every weight.

Chunk caches are valid for one exact set of weights, so a fine-tune that moves a single value
must not share keys with its base model: the print hashes all of them (SHA-256, once per load;
docs/benchmarks.md has its cost).
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash", "use_cache")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the config (less its volatile fields) and each state tensor's name, shape, dtype and
    bytes; a tensor tied to one already hashed (tied embeddings) contributes that one's name instead."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    hashed: dict[tuple, str] = {}
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            same = (t.device, t.data_ptr(), t.shape, t.stride(), t.dtype)
            if same in hashed:
                h.update(f"={hashed[same]}".encode())
                continue
            hashed[same] = name
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]
