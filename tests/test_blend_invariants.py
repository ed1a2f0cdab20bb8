"""The blend's invariants (docs/design.md, section 6) on tiny random-weight models of every supported architecture."""
import pytest
import torch
from transformers import DynamicCache

from kvblend import BlendConfig, KVBlend
from kvblend.engines.hf import Sampling, decode
from kvblend.engines.reference import reference_decode
from kvblend.kernels import rotate

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
CHUNKS = [
    "Alice keeps the spare key under the blue flowerpot by the back door.",
    "The train to Lyon leaves at seven; the one to Turin leaves at nine.",
    "Bob's favourite number is forty-two, and he writes it on every page.",
]
QUESTION = "Where is the spare key?"


@pytest.fixture(scope="module", params=ARCHS)
def kb(request, tiny_models):
    kb = KVBlend(model=str(tiny_models[request.param]))
    kb.precompute(CHUNKS)
    return kb


def segment_reference(kb: KVBlend, chunks, question, cached: set[int]):
    """PromptCache semantics through transformers alone: cached chunks' stored KV is appended
    realigned; fresh segments run through the model's own forward on top of the cache."""
    prompt = kb.build_prompt(chunks, question)
    cfg = kb.model.config
    cache = DynamicCache(config=cfg)
    cos, sin = kb.adapter.rope_tables(len(prompt.ids))
    logits = None
    for seg, start in zip(prompt.segments, prompt.starts()):
        pos = torch.arange(start, start + len(seg.ids))
        if seg.chunk is not None and seg.chunk in cached:
            kv = kb.store.get(kb.key_for(seg.ids))
            for i in range(kv.num_layers):
                k, v = kv.layer(i)
                cache.update(rotate(k, cos[pos], sin[pos])[None], v[None], i)
        else:
            out = kb.model(input_ids=torch.tensor([seg.ids]), past_key_values=cache, position_ids=pos[None], use_cache=True)
            logits = out.logits[0, -1].float()
    return cache, logits


def test_full_recompute_reproduces_full_prefill(kb):
    """Invariant 1: r = 1 reproduces a full prefill (logits within 1e-4, same greedy tokens)."""
    full = kb.prefill(CHUNKS[::-1], QUESTION, "full")
    blend = kb.prefill(CHUNKS[::-1], QUESTION, "blend", config=BlendConfig(recompute_ratio=1.0))
    assert blend.stats.chunk_hits == 3 and blend.stats.tokens_recomputed == blend.stats.tokens_cached
    assert torch.allclose(blend.logits, full.logits, atol=1e-4)
    for i in range(kb.adapter.num_layers):
        assert torch.allclose(blend.cache.layers[i].keys, full.cache.layers[i].keys, atol=1e-4)
    a = kb.generate(CHUNKS[::-1], QUESTION, max_new_tokens=8, method="full").token_ids
    b = kb.generate(CHUNKS[::-1], QUESTION, max_new_tokens=8, config=BlendConfig(recompute_ratio=1.0)).token_ids
    assert a == b


def assert_matches_reference(pre, ref_cache, ref_logits, layers: int) -> None:
    torch.testing.assert_close(pre.logits, ref_logits, atol=1e-4, rtol=0)
    for i in range(layers):
        torch.testing.assert_close(pre.cache.layers[i].keys, ref_cache.layers[i].keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(pre.cache.layers[i].values, ref_cache.layers[i].values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["reuse", "blend"])
def test_zero_ratio_without_check_is_full_reuse(kb, method):
    """Invariant 2: r = 0 with no check layer (and the reuse method) equals PromptCache-style full
    reuse as transformers computes it segment by segment."""
    order = [2, 0, 1]
    chunks = [CHUNKS[i] for i in order]
    ref_cache, ref_logits = segment_reference(kb, chunks, QUESTION, cached={0, 1, 2})
    config = BlendConfig(recompute_ratio=0.0, check_layers=[]) if method == "blend" else None
    pre = kb.prefill(chunks, QUESTION, method, config=config)
    assert pre.stats.tokens_recomputed == 0 and pre.stats.chunk_hits == 3
    assert_matches_reference(pre, ref_cache, ref_logits, kb.adapter.num_layers)


@pytest.mark.parametrize("missing", [0, 1], ids=["leading-miss", "middle-miss"])
def test_reuse_with_a_miss_equals_the_segment_reference(kb, missing):
    """A chunk the store does not have is computed as fresh text over the reused KV before it,
    and the hits after it are still reused as stored: transformers, segment by segment."""
    chunks = list(CHUNKS)
    chunks[missing] = "Carol painted the garage door green last summer, twice."
    pre = kb.prefill(chunks, QUESTION, "reuse")
    assert (pre.stats.chunk_hits, pre.stats.chunk_misses) == (2, 1)
    ref_cache, ref_logits = segment_reference(kb, chunks, QUESTION, cached={0, 1, 2} - {missing})
    assert_matches_reference(pre, ref_cache, ref_logits, kb.adapter.num_layers)


def test_realigned_keys_equal_fresh_keys_at_layer0(kb):
    """Invariant 3: at layer 0 a key depends on its token and position only."""
    full = kb.prefill(CHUNKS, QUESTION, "full")
    reuse = kb.prefill(CHUNKS, QUESTION, "reuse")
    torch.testing.assert_close(reuse.cache.layers[0].keys, full.cache.layers[0].keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(reuse.cache.layers[0].values, full.cache.layers[0].values, atol=1e-5, rtol=0)


def test_chunk_first_after_its_context_reproduces_its_kv(kb):
    """Invariant 4: [context] + chunk at the start of a prompt has exactly the stored KV."""
    ids = kb.builder.encode(CHUNKS[1])
    prompt = kb.context_ids + ids + kb.builder.encode(" Tell me more.")
    cache = DynamicCache(config=kb.model.config)
    kb.model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    kv = kb.store.get(kb.key_for(ids))
    skip = len(kb.context_ids)
    pos = torch.arange(skip, skip + len(ids))
    cos, sin = kb.adapter.rope_tables(len(prompt))
    for i in range(kv.num_layers):
        k, v = kv.layer(i)
        torch.testing.assert_close(rotate(k, cos[pos], sin[pos]), cache.layers[i].keys[0][:, pos], atol=1e-5, rtol=0)
        torch.testing.assert_close(v, cache.layers[i].values[0][:, pos], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_hf_engine_decodes_like_reference_engine(kb, ratio):
    """Invariant 5: the HF engine continues the fused KV exactly as the reference engine does."""
    config = BlendConfig(recompute_ratio=ratio, check_layers=[1] if 0 < ratio < 1 else [])
    pre = kb.prefill(CHUNKS, QUESTION, "blend", config=config)
    keys = [layer.keys[0].clone() for layer in pre.cache.layers]
    values = [layer.values[0].clone() for layer in pre.cache.layers]
    hf = list(decode(kb.model, pre.cache, pre.logits, pre.ids.numel(), 10, Sampling(), stop_ids=set()))
    ref = reference_decode(kb.adapter, keys, values, pre.logits, 10)
    assert hf == ref


def test_blend_sits_between_reuse_and_full(kb):
    """Recomputing the most deviating tokens moves the answer distribution towards full prefill."""
    from kvblend.eval.metrics import kl_divergence

    full = kb.prefill(CHUNKS, QUESTION, "full").logits
    kl = {r: float(kl_divergence(full, kb.prefill(CHUNKS, QUESTION, "blend", config=BlendConfig(recompute_ratio=r)).logits))
          for r in (0.3, 0.7)}
    kl_reuse = float(kl_divergence(full, kb.prefill(CHUNKS, QUESTION, "reuse").logits))
    assert kl[0.7] < kl_reuse and kl[0.3] < kl_reuse


def test_head_context_makes_the_first_chunk_exact(tiny_models):
    """chunk_context="head": a chunk encoded after the prompt's template head is, when it stands
    first, exactly the full prefill's KV, so reusing a lone chunk is a full prefill."""
    kb = KVBlend(model=str(tiny_models["llama"]), config=BlendConfig(chunk_context="head"))
    head = kb.builder.encode(kb.builder.head)
    assert len(head) > 1 and kb.context_ids == head
    kb.precompute(CHUNKS[:1])
    full = kb.prefill(CHUNKS[:1], QUESTION, "full")
    reuse = kb.prefill(CHUNKS[:1], QUESTION, "reuse")
    assert reuse.stats.chunk_hits == 1 and reuse.stats.tokens_recomputed == 0
    torch.testing.assert_close(reuse.logits, full.logits, atol=1e-4, rtol=0)
    bos = KVBlend(model=str(tiny_models["llama"]), config=BlendConfig(chunk_context="bos"))
    assert bos.key_for([5, 6]) != kb.key_for([5, 6])  # another context is another cache


@pytest.mark.parametrize("primer", [None, "A passage of the user's own corpus, about rivers and their bridges."])
def test_primed_context_is_exact_after_another_document(tiny_models, primer):
    """chunk_context="primed": a chunk is encoded after the head, a passage (the primer) and the
    separator, so in a prompt whose first document is that passage it reuses the full prefill's KV."""
    from kvblend.blend.chunks import PRIMER

    kb = KVBlend(model=str(tiny_models["llama"]), config=BlendConfig(chunk_context="primed", primer=primer))
    b = kb.builder
    assert kb.context_ids == b.encode(b.head) + b.encode(primer or PRIMER) + b.encode(b.separator)
    kb.precompute(CHUNKS[1:2])
    prompt = [primer or PRIMER, CHUNKS[1]]
    reuse = kb.prefill(prompt, QUESTION, "reuse")
    assert (reuse.stats.chunk_hits, reuse.stats.chunk_misses) == (1, 1)  # the passage itself is not cached
    torch.testing.assert_close(reuse.logits, kb.prefill(prompt, QUESTION, "full").logits, atol=1e-4, rtol=0)
    head = KVBlend(model=str(tiny_models["llama"]), config=BlendConfig(chunk_context="head"))
    assert head.key_for([5, 6]) != kb.key_for([5, 6])
