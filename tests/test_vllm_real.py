"""vLLM engine on the real default model (SmolLM2-135M, fp32, CPU): same greedy tokens as transformers.

One `LLM` for the module, eager (no torch.compile at start-up). Skipped where vLLM is not installed.
"""
import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'kvblend[vllm]', see docs/vllm.md)")

from kvblend.engines.vllm import VLLMEngine  # noqa: E402

pytestmark = pytest.mark.real_model
TOKENS = 16
EXAMPLES = ("1", "2", "3")


@pytest.fixture(scope="module")
def engine(real_kb):
    with VLLMEngine(real_kb, kv_cache_bytes=256 << 20, max_model_len=4096, enforce_eager=True) as eng:
        yield eng


def vllm(engine):
    """The engine's KVBlend answering through vLLM (its own `kb` answers through transformers)."""
    return engine.kb.with_engine(engine)


@pytest.fixture(scope="module")
def examples(datasets):
    out = []
    for name in EXAMPLES:
        d = json.loads((datasets / "cacheblend" / f"{name}.json").read_text())
        out.append(([d[str(i)] for i in range(d["chunk_num"])], d["query"]))
    return out


@pytest.mark.parametrize("method", ["blend", "full"])
def test_vllm_and_transformers_give_the_same_tokens(engine, examples, method):
    kb = engine.kb
    for chunks, question in examples:
        kb.precompute(chunks)
        on_vllm = vllm(engine).generate(chunks, question, max_new_tokens=TOKENS, method=method)
        on_hf = kb.generate(chunks, question, max_new_tokens=TOKENS, method=method)
        assert on_vllm.token_ids == on_hf.token_ids, (on_vllm.text, on_hf.text)
        assert on_vllm.stats.engine_cached_tokens == (on_vllm.stats.tokens_total if method == "blend" else 0)


def test_a_chunk_lost_from_the_store_is_recomputed(engine, examples):
    """The lost chunk's tokens are recomputed in the blend; both engines agree under the same fault."""
    kb = engine.kb
    chunks, question = examples[0]
    kb.precompute(chunks)
    kb.store.discard(kb.key_for(kb.builder.encode(chunks[2])), "test: lost")
    on_vllm = vllm(engine).generate(chunks, question, max_new_tokens=TOKENS)
    on_hf = kb.generate(chunks, question, max_new_tokens=TOKENS)
    assert on_vllm.stats.chunk_misses == 1 and on_vllm.stats.chunk_hits == len(chunks) - 1
    assert on_vllm.token_ids == on_hf.token_ids
