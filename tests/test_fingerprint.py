"""The model fingerprint (part of every chunk's cache key) covers every weight, and a process with
no model loaded (vLLM's worker) computes the same print from the checkpoint files."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvblend.models import LayerwiseModel
from kvblend.models.fingerprint import checkpoint_fingerprint
from tiny import ARCHS


def fingerprint(folder, edit=None, dtype=torch.float32) -> str:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    return LayerwiseModel(model).fingerprint


def test_a_fine_tune_that_moves_one_weight_gets_another_fingerprint(tiny_models):
    """One value off the old sampler's stride (index 1 of a tensor of over 8,192 values) changed:
    a fine-tune that moves a few weights must not share cache keys with its base model."""
    folder = tiny_models["llama"]
    base = fingerprint(folder)
    assert fingerprint(folder) == base  # a property of the weights, not of the load

    def nudge(name):
        def edit(model):
            p = model.get_parameter(name)
            assert p.numel() > 8192
            p.view(-1)[1] += 1e-3
        return edit

    for name in ("model.embed_tokens.weight", "model.layers.2.mlp.down_proj.weight", "lm_head.weight"):
        assert fingerprint(folder, nudge(name)) != base, name


def test_tied_weights_are_hashed_once_and_still_count(tiny_models, tmp_path):
    from tiny import make_tiny_model

    folder = make_tiny_model(tmp_path, "llama", layers=1, tie_word_embeddings=True)
    base = fingerprint(folder)
    assert checkpoint_fingerprint(folder, torch.float32) == base

    def edit(model):
        model.model.embed_tokens.weight.view(-1)[1] += 1e-3  # lm_head is the same tensor

    assert fingerprint(folder, edit) != base


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_checkpoint_files_give_the_loaded_models_print(tiny_models, arch, dtype):
    """What vLLM's worker computes from the folder equals what the transformers side computes from
    the loaded model, in the load dtype (the stored float32 converted as transformers converts it)."""
    assert checkpoint_fingerprint(tiny_models[arch], dtype) == fingerprint(tiny_models[arch], dtype=dtype)


def test_the_print_does_not_depend_on_how_the_checkpoint_is_sharded(tiny_models, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert checkpoint_fingerprint(tmp_path, torch.float32) == fingerprint(tiny_models["qwen2"])


def test_config_and_dtype_change_the_checkpoint_print(tiny_models, tmp_path):
    folder = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.rms_norm_eps *= 2
    model.save_pretrained(tmp_path)
    base = checkpoint_fingerprint(folder, torch.float32)
    assert checkpoint_fingerprint(tmp_path, torch.float32) != base
    assert checkpoint_fingerprint(folder, torch.bfloat16) != base
