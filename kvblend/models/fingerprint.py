"""A model's identity for cache keys: architecture, config and every byte of every weight.

Chunk caches are valid for one exact set of weights, so a fine-tune that moves a single value
must not share keys with its base model: the print hashes all of them (SHA-256, once per load;
docs/benchmarks.md has its cost).

The print is defined on the transformers layout of the weights as loaded: the config as
transformers parses it, then each state tensor by its transformers name, in the load dtype. Two
processes compute it:

- `model_fingerprint` from a loaded transformers model (what `LayerwiseModel` uses): the bytes
  the model really runs, so weights edited in memory get their own print.
- `checkpoint_fingerprint` from a Hugging Face folder of safetensors files and the load dtype,
  with no model loaded: each stored tensor converted to that dtype, as transformers converts it
  when loading. vLLM's worker uses it (its loaded weights are fused, renamed, padded and, on
  CPU, repacked into kernel layouts that drop the plain weight), and so can a process that holds
  no weights. For a folder transformers loads as stored, both give the same print (tests check it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash", "use_cache")
TIED = {"lm_head.weight": "model.embed_tokens.weight"}  # tied output embedding → the tensor it is (hashed once)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the config (less its volatile fields) and each state tensor's name, shape, dtype and
    bytes. A tensor tied to its source (TIED) is left out, as checkpoints leave it out; any other
    tensor sharing storage with one already hashed contributes that one's name instead."""
    state = model.state_dict()
    h = hashlib.sha256(_config_bytes(model.config.to_dict()))
    hashed: dict[tuple, str] = {}
    with torch.no_grad():
        for name, t in sorted(state.items()):
            source = state.get(TIED.get(name, ""))
            if source is not None and _storage(source) == _storage(t):
                continue
            _update(h, name, t)
            same = _storage(t)
            if same in hashed:
                h.update(f"={hashed[same]}".encode())
                continue
            hashed[same] = name
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def checkpoint_fingerprint(folder: str | Path, dtype: torch.dtype) -> str:
    """`model_fingerprint` of the model transformers would load from `folder` in `dtype`, computed
    from the folder's config.json and safetensors files alone (one tensor in memory at a time)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    files = weight_files(folder)
    if files is None:
        raise FileNotFoundError(f"{folder} holds no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}: "
                                "a checkpoint fingerprint needs safetensors weights")
    cfg = AutoConfig.from_pretrained(folder)
    h = hashlib.sha256(_config_bytes(cfg.to_dict()))
    handles = {path: safe_open(path, framework="pt") for path in files}
    owner: dict[str, Path] = {}
    for path, f in handles.items():
        for name in f.keys():
            if name in owner:
                raise ValueError(f"tensor {name} is stored twice ({owner[name].name}, {path.name})")
            owner[name] = path
    if getattr(cfg, "tie_word_embeddings", False):
        for name in TIED:
            owner.pop(name, None)  # the loaders tie it to its source and ignore a stored copy
    for name in sorted(owner):
        t = handles[owner[name]].get_tensor(name).to(dtype)
        _update(h, name, t)
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def weight_files(folder: str | Path) -> list[Path] | None:
    """The safetensors files of a Hugging Face folder (the shards its index names, else
    model.safetensors), or None when it has neither."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / SAFETENSORS_SINGLE
    return [single] if single.is_file() else None


def _config_bytes(cfg: dict) -> bytes:
    return json.dumps({k: v for k, v in cfg.items() if k not in VOLATILE_CONFIG}, sort_keys=True, default=str).encode()


def _storage(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.shape, t.stride(), t.dtype)


def _update(h, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
