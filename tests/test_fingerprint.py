"""The model fingerprint (part of every chunk's cache key) covers every weight."""
import torch
from transformers import AutoModelForCausalLM

from kvblend.models import LayerwiseModel


def fingerprint(folder, edit=None) -> str:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
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

    def edit(model):
        model.model.embed_tokens.weight.view(-1)[1] += 1e-3  # lm_head is the same tensor

    assert fingerprint(folder, edit) != base
