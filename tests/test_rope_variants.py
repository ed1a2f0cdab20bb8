"""Every rope type transformers has for the supported families: r = 1 reproduces the model's own
forward, prompt after prompt, and the reference decoder rotates as transformers' decode does.

dynamic and longrope derive their frequencies from the longest position of each call, so a
prompt must be rotated with tables made for exactly its positions: a table made once for more
positions (or kept from a longer prompt) rotates with the wrong frequencies."""
import pytest
import torch

from tiny import ARCHS, make_tiny_model

from kvblend import BlendConfig, KVBlend
from kvblend.engines.reference import reference_decode
from kvblend.kernels import rope_realign, rotate
from kvblend.models import LayerwiseModel, UnsupportedModelError

THETA = {"rope_theta": 10000.0}
ROPES = {
    "default": dict(rope_parameters={"rope_type": "default", **THETA}),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, **THETA}),
    # scaled only past max_position_embeddings, which a prompt never is: a 4096-row table was scaled
    "dynamic": dict(max_position_embeddings=64, rope_parameters={"rope_type": "dynamic", "factor": 2.0, **THETA}),
    "yarn": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, **THETA}),
    # short factors up to 32 positions, long factors past them
    "longrope": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)], "long_factor": [2.0 + i for i in range(8)],
        "original_max_position_embeddings": 32, **THETA}),
    "llama3": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, **THETA}),
}
SHORT = (["Ann has a key."], "Who?")  # 24 tokens
MEDIUM = (["Ann has a key.", "Bo is tall."], "Who?")  # 37 tokens
LONG = (["Ann has a key under the pot by the door.", "Bo is tall and he runs."], "Who?")  # 75 tokens


@pytest.fixture(scope="module", params=[(a, r) for a in ARCHS for r in ROPES], ids=lambda p: f"{p[0]}-{p[1]}")
def kb(request, tmp_path_factory):
    arch, rope = request.param
    folder = make_tiny_model(tmp_path_factory.mktemp(f"{arch}-{rope}"), arch, layers=2, **ROPES[rope])
    kb = KVBlend(model=str(folder), config=BlendConfig(chunk_context="bos"))  # a primer would not fit 64 positions
    assert kb.model.model.rotary_emb.rope_type == rope
    return kb


def test_full_recompute_equals_the_models_forward_prompt_after_prompt(kb):
    """Short, then long (past longrope's original length), then short again; dynamic's 64
    positions leave it the short and medium prompts."""
    prompts = [p for p in (SHORT, LONG, MEDIUM, SHORT) if len(kb.build_prompt(*p).ids) <= kb.adapter.max_positions]
    assert len(prompts) >= 3
    for chunks, question in prompts:
        kb.precompute(chunks)
        full = kb.prefill(chunks, question, "full")
        blend = kb.prefill(chunks, question, "blend", config=BlendConfig(recompute_ratio=1.0))
        assert blend.stats.chunk_hits == len(chunks)
        torch.testing.assert_close(blend.logits, full.logits, atol=1e-4, rtol=0)
        for i in range(kb.adapter.num_layers):
            torch.testing.assert_close(blend.cache.layers[i].keys, full.cache.layers[i].keys, atol=1e-5, rtol=0)


def test_reference_decoder_rotates_like_transformers_decode(kb):
    """Decoding from 24 tokens past 32 positions (longrope's switch to long factors on the way)."""
    chunks, question = SHORT
    full = kb.prefill(chunks, question, "full")
    keys = [layer.keys[0] for layer in full.cache.layers]
    values = [layer.values[0] for layer in full.cache.layers]
    ref = reference_decode(kb.adapter, keys, values, full.logits, 16)
    hf = kb.generate(chunks, question, max_new_tokens=16, method="full").token_ids
    assert hf == ref[: len(hf)] and len(hf) > 1


def test_partial_rotary_is_refused(tmp_path):
    """A rotary table narrower than the head (partial_rotary_factor < 1): transformers' own forward
    for these families cannot apply it, and the blend refuses the model by name."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(tmp_path, "llama", layers=1, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5, **THETA})
    model = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match="partial rotary embedding .8 of 16 head dims"):
        LayerwiseModel(model)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rope_kernels_refuse_a_table_narrower_than_the_keys(backend, monkeypatch):
    """A half-width table was a broadcast error in torch and an out-of-bounds read in Triton."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    keys, cos, sin = torch.randn(2, 5, 16), torch.randn(10, 8), torch.randn(10, 8)
    realign = rope_realign
    if backend == "triton":
        from kvblend.kernels.triton_rope import rope_realign_triton as realign
    with pytest.raises(ValueError, match="rotary table of width 8 for head dim 16"):
        realign(keys, cos, sin, torch.arange(5), torch.zeros(2, 10, 16))
    with pytest.raises(ValueError, match="rotary table of width 8 for head dim 16"):
        rotate(keys, cos[:5], sin[:5])
