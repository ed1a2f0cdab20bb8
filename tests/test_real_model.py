"""Integration tests on the real default model (SmolLM2-135M-Instruct, fp32, CPU)."""
import json

import pytest
import torch

from kvblend import BlendConfig

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def example(datasets):
    d = json.loads((datasets / "cacheblend" / "2.json").read_text())
    return [d[str(i)] for i in range(3)], d["query"]


def test_full_recompute_gives_full_prefill_tokens(real_kb, example):
    """Invariant 1 on the real model: r = 1 gives full prefill's greedy tokens exactly."""
    chunks, question = example
    real_kb.precompute(chunks)
    full = real_kb.generate(chunks, question, max_new_tokens=12, method="full")
    blend = real_kb.generate(chunks, question, max_new_tokens=12, config=BlendConfig(recompute_ratio=1.0))
    assert blend.stats.chunk_hits == 3
    assert blend.token_ids == full.token_ids
    a = real_kb.prefill(chunks, question, "full").logits
    b = real_kb.prefill(chunks, question, config=BlendConfig(recompute_ratio=1.0)).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_realigned_keys_equal_fresh_keys_at_layer0(real_kb, example):
    """Invariant 3 on the real model."""
    chunks, question = example
    real_kb.precompute(chunks)
    full = real_kb.prefill(chunks[::-1], question, "full").cache.layers[0]
    reuse = real_kb.prefill(chunks[::-1], question, "reuse").cache.layers[0]
    torch.testing.assert_close(reuse.keys, full.keys, atol=1e-5, rtol=0)


def test_blend_answers_and_recomputes_its_budget(real_kb, example):
    chunks, question = example
    real_kb.precompute(chunks)
    result = real_kb.generate(chunks, question, max_new_tokens=12)
    s = result.stats
    assert result.text and s.chunk_hits == 3 and s.chunk_misses == 0
    assert s.tokens_recomputed == -(-8 * s.tokens_cached // 100)  # ceil(0.08 · N_cached), the default ratio
