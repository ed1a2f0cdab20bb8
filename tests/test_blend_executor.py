"""Executor behaviour: exact masking, non-prefix reuse, selection policies, bad input."""
import math

import pytest
import torch

from tiny import dense_attention

from kvblend import BlendConfig, KVBlend
from kvblend.kernels import plan_attention, selected_attention
from kvblend.models import UnsupportedModelError
from kvblend.store import DirectoryStore

CHUNKS = [
    "Alice keeps the spare key under the blue flowerpot by the back door.",
    "The train to Lyon leaves at seven; the one to Turin leaves at nine.",
    "Bob's favourite number is forty-two, and he writes it on every page.",
]
QUESTION = "Where is the spare key?"


@pytest.fixture(scope="module")
def kb(tiny_models):
    kb = KVBlend(model=str(tiny_models["qwen3"]))
    kb.precompute(CHUNKS)
    return kb


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("block", [3, 128])
@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto: the C++ kernel on CPU
def test_scattered_selection_matches_dense_masked_attention(heads, kv_heads, block, backend):
    torch.manual_seed(0)
    n, d = 57, 16
    q_pos = torch.tensor(sorted(torch.randperm(n)[:19].tolist()))  # scattered, not a suffix
    q = torch.randn(heads, q_pos.numel(), d)
    k, v = torch.randn(kv_heads, n, d), torch.randn(kv_heads, n, d)
    plan = plan_attention(q_pos, n, heads // kv_heads, block)
    out = selected_attention(q, k, v, plan, d**-0.5, backend=backend)
    torch.testing.assert_close(out, dense_attention(q, k, v, q_pos, d**-0.5), atol=1e-5, rtol=1e-5)


def test_attention_plan_rejects_unsorted_positions():
    with pytest.raises(ValueError, match="strictly increasing"):
        plan_attention(torch.tensor([3, 1]), 5, 1)


def test_non_prefix_reuse_when_first_chunk_misses(kb):
    """A miss in front does not stop the later hits from being reused."""
    fresh_chunk = "Carol painted the garage door green last summer, twice."
    chunks = [fresh_chunk] + CHUNKS[1:]
    pre = kb.prefill(chunks, QUESTION, "blend")
    assert (pre.stats.chunk_hits, pre.stats.chunk_misses) == (2, 1)
    assert pre.stats.tokens_cached == sum(len(kb.builder.encode(c)) for c in CHUNKS[1:])
    # the missed chunk is computed as fresh text: with r = 1 the result is still a full prefill
    exact = kb.prefill(chunks, QUESTION, "blend", config=BlendConfig(recompute_ratio=1.0))
    torch.testing.assert_close(exact.logits, kb.prefill(chunks, QUESTION, "full").logits, atol=1e-4, rtol=0)


def test_recompute_budget_and_gradual_filtering(kb):
    n_cached = sum(len(kb.builder.encode(c)) for c in CHUNKS)
    pre = kb.prefill(CHUNKS, QUESTION, "blend", config=BlendConfig(recompute_ratio=0.2))
    assert pre.stats.tokens_recomputed == math.ceil(0.2 * n_cached)
    cfg = BlendConfig(recompute_ratio=0.1, check_layers=[1, 2], check_ratios=[0.4, 0.1])
    assert kb.prefill(CHUNKS, QUESTION, "blend", config=cfg).stats.tokens_recomputed == math.ceil(0.1 * n_cached)


@pytest.mark.parametrize("overrides", [dict(selection="query"), dict(selection="random"), dict(deviation="k"),
                                       dict(deviation="kv"), dict(sink_tokens=3)])
def test_selection_variants_spend_the_same_budget(kb, overrides):
    base = kb.prefill(CHUNKS, QUESTION, "blend", config=BlendConfig(recompute_ratio=0.25))
    variant = kb.prefill(CHUNKS, QUESTION, "blend", config=BlendConfig(recompute_ratio=0.25, **overrides))
    assert variant.stats.tokens_recomputed == base.stats.tokens_recomputed
    assert torch.isfinite(variant.logits).all()


def test_sink_tokens_are_recomputed(kb):
    ex = kb.executor
    prompt = kb.build_prompt(CHUNKS, QUESTION)
    from kvblend.blend.executor import CachedSpan

    spans = [CachedSpan(start, kb.store.get(kb.key_for(seg.ids))) for seg, start in zip(prompt.segments, prompt.starts()) if seg.chunk is not None]
    out = ex.run(torch.tensor(prompt.ids), spans, config=BlendConfig(recompute_ratio=0.2, sink_tokens=2))
    for s in spans:
        assert {s.start, s.start + 1} <= set(out.selected.tolist())


@pytest.mark.parametrize("method", ["blend", "reuse"])
def test_blend_into_given_buffers_equals_blend_into_fresh_ones(kb, method):
    """kv_out (how the vLLM engine blends straight into its hand-off file) changes nothing but where KV lands."""
    m = kb.adapter
    n = len(kb.build_prompt(CHUNKS, QUESTION).ids)
    ref = kb.prefill(CHUNKS, QUESTION, method)
    layers = [(torch.full((m.num_kv_heads, n, m.head_dim), float("nan")), torch.full((m.num_kv_heads, n, m.head_dim), float("nan")))
              for _ in range(m.num_layers)]
    pre = kb.prefill(CHUNKS, QUESTION, method, kv_out=layers)
    assert pre.cache is None and torch.equal(pre.logits, ref.logits)
    for (k, v), layer in zip(layers, ref.cache.layers):
        assert torch.equal(k, layer.keys[0]) and torch.equal(v, layer.values[0])  # every row written (no NaN left)
    with pytest.raises(ValueError, match=r"kv_out layer 0: \(1, 3, 2\)"):
        kb.prefill(CHUNKS, QUESTION, method, kv_out=[(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))] * m.num_layers)
    with pytest.raises(ValueError, match="kv_out has 1 layers"):
        kb.prefill(CHUNKS, QUESTION, method, kv_out=layers[:1])
    with pytest.raises(ValueError, match="kv_out is for blend and reuse"):
        kb.prefill(CHUNKS, QUESTION, "full", kv_out=layers)


def test_config_validation():
    with pytest.raises(ValueError, match="non-increasing"):
        BlendConfig(recompute_ratio=0.2, check_layers=[1, 2], check_ratios=[0.1, 0.2])
    with pytest.raises(ValueError, match="at least one check layer"):
        BlendConfig(recompute_ratio=0.3, check_layers=[])
    with pytest.raises(ValueError):
        BlendConfig(recompute_ratio=1.5)
    with pytest.raises(ValueError, match="primer"):
        BlendConfig(chunk_context="primed", primer="")
    with pytest.raises(ValueError, match='only used with chunk_context="primed"'):
        BlendConfig(primer="a passage")
    from kvblend.eval.methods import parse_methods

    with pytest.raises(ValueError, match="chunk encoding is set once per run"):
        parse_methods("full,blend[chunk_context=head]", BlendConfig())


def test_bad_input_is_a_clear_error(kb):
    with pytest.raises(ValueError, match="no chunks"):
        kb.generate([], QUESTION)
    with pytest.raises(ValueError, match="chunk 1 is empty"):
        kb.generate([CHUNKS[0], "   "], QUESTION)
    with pytest.raises(ValueError, match="chunk 0 is empty"):
        kb.precompute([""])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        kb.prefill(["x" * 5000], QUESTION)
    with pytest.raises(ValueError, match="check layer 9 is past"):
        kb.prefill(CHUNKS, QUESTION, config=BlendConfig(check_layers=[9]))


def test_cache_of_another_model_or_dtype_is_a_miss(tiny_models, tmp_path):
    """Two models sharing one store directory never see each other's caches."""
    store = DirectoryStore(tmp_path / "store")
    a = KVBlend(model=str(tiny_models["llama"]), store=store)
    a.precompute(CHUNKS)
    for other in (KVBlend(model=str(tiny_models["mistral"]), store=DirectoryStore(tmp_path / "store")),
                  KVBlend(model=str(tiny_models["llama"]), dtype="bfloat16", store=DirectoryStore(tmp_path / "store"))):
        pre = other.prefill(CHUNKS, QUESTION, "blend", config=BlendConfig(recompute_ratio=1.0))
        assert (pre.stats.chunk_hits, pre.stats.chunk_misses) == (0, 3)
        full = other.prefill(CHUNKS, QUESTION, "full")
        assert int(pre.logits.argmax()) == int(full.logits.argmax())


def test_forged_store_entry_is_a_miss(kb):
    """An object stored under a right key but made by another model is refused."""
    ids = kb.builder.encode(CHUNKS[0])
    key = kb.key_for(ids)
    good = kb.store.get(key)
    from kvblend.store import ChunkKV, MemoryStore

    forged = MemoryStore()
    forged.put(key, ChunkKV(key, "another-model", good.keys.clone(), good.values.clone()))
    original, kb.store = kb.store, forged
    try:
        assert kb.prefill(CHUNKS[:1], QUESTION).stats.chunk_misses == 1
    finally:
        kb.store = original


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvblend.models import LayerwiseModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        LayerwiseModel(model)
