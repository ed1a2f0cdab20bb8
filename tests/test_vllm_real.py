"""The vLLM engine on the real default model (SmolLM2-135M, fp32, CPU, eager, a small KV cache):
blended requests carry a plan, the worker's connector opens the store, blends on vLLM's own modules
and writes the fused KV into vLLM's blocks.

One `LLM` for the module. Compared token for token with the transformers engine's blend and with
vLLM's own full prefill, on MuSiQue records (3 chunks each) and CacheBlend examples.
"""
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'kvblend[vllm]', see docs/vllm.md)")

from tiny import make_tiny_model  # noqa: E402

from kvblend import BlendConfig, KVBlend  # noqa: E402
from kvblend.config import KVBlendConfig  # noqa: E402
from kvblend.engines.vllm import VLLMEngine  # noqa: E402
from kvblend.eval.datasets import load_dataset  # noqa: E402
from kvblend.store import StoreConfig  # noqa: E402

pytestmark = pytest.mark.real_model
TOKENS = 10
BLEND = BlendConfig(selection="deviation", recompute_ratio=0.15)  # CacheBlend's: on record 1 its tokens differ from full prefill's


class Held:
    """Holds the engine (whose `LLM`'s repr, which pytest takes for a failure report, is an RPC)."""

    def __init__(self, engine: VLLMEngine, records, examples):
        self.engine, self.records, self.examples = engine, records, examples
        self.kb = engine.kb  # answers through transformers
        self.vllm = engine.kb.with_engine(engine)  # answers through vLLM, blending in its worker


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    records = load_dataset("musique-dev", top_k=3, limit=2) + [r for i in (1, 2, 3) for r in load_dataset(f"cacheblend-{i}")]
    store = StoreConfig(disk_dir=str(tmp_path_factory.mktemp("worker_blend") / "store"), cpu_bytes=0, codec="raw",
                        async_writes=False)
    kb = KVBlend(config=KVBlendConfig(store=store))
    kb.precompute([c for r in records for c in r.chunks])
    with VLLMEngine(kb, kv_cache_bytes=256 << 20, max_model_len=4096, enforce_eager=True) as engine:
        yield Held(engine, records[:2], records[2:])
    kb.close()


def hf_tokens(held: Held, record, method: str = "blend", config: BlendConfig | None = BLEND) -> list[int]:
    """The transformers engine's greedy tokens for a record."""
    return held.kb.generate(record.chunks, record.question, max_new_tokens=TOKENS, method=method,
                            config=config if method == "blend" else None).token_ids


def test_blend_in_the_worker_gives_the_hf_engine_tokens(held):
    """Invariant 5 with the blend in vLLM's worker: the transformers engine's greedy tokens; every
    prompt token but the last came from the fused KV (vLLM computed the last one). On record 1 the
    blend's tokens are not a full prefill's, so a blend that fell back to vLLM's prefill would show."""
    results = held.vllm.generate_many([(r.chunks, r.question) for r in held.records], max_new_tokens=TOKENS, config=BLEND)
    for record, result in zip(held.records, results):
        assert result.token_ids == hf_tokens(held, record)
        assert result.stats.engine_cached_tokens == result.stats.tokens_total - 1
    assert results[1].token_ids != hf_tokens(held, held.records[1], "full")


@pytest.mark.parametrize("method", ["blend", "full"])
def test_cacheblend_examples_give_the_hf_engine_tokens(held, method):
    """CacheBlend's own examples (longer prompts, more chunks): the same greedy tokens on both engines."""
    for r in held.examples:
        on_vllm = held.vllm.generate(r.chunks, r.question, max_new_tokens=TOKENS, method=method, config=BLEND)
        assert on_vllm.token_ids == hf_tokens(held, r, method), r.question
        assert on_vllm.stats.engine_cached_tokens == (on_vllm.stats.tokens_total - 1 if method == "blend" else 0)


@pytest.mark.parametrize("tokens", [1, TOKENS])
def test_the_workers_blend_reports_its_counts_to_the_caller(held, tokens):
    """The counts come from the worker's blend (the planning process cannot know what it recomputed),
    also for a request that finishes in the step that blended it (one token)."""
    r = held.records[0]
    in_worker = held.vllm.generate(r.chunks, r.question, max_new_tokens=tokens, config=BLEND).stats
    here = held.kb.generate(r.chunks, r.question, max_new_tokens=tokens, config=BLEND).stats
    assert in_worker.tokens_recomputed == here.tokens_recomputed > 0
    assert (in_worker.tokens_cached, in_worker.chunk_hits, in_worker.reused) == (here.tokens_cached, 3, [True] * 3)
    assert in_worker.recompute_ratio == 0.15 and in_worker.stages_s["worker_blend"] > 0


def test_reuse_in_the_worker_gives_the_hf_engine_tokens(held):
    r = held.records[1]
    result = held.vllm.generate(r.chunks, r.question, max_new_tokens=TOKENS, method="reuse")
    assert result.token_ids == hf_tokens(held, r, "reuse") != hf_tokens(held, r, "full")


def test_full_recompute_in_the_worker_gives_vllms_full_prefill(held):
    """Invariant 1: r = 1 in the worker reproduces vLLM's own prefill token for token."""
    r = held.records[1]
    full = held.vllm.generate(r.chunks, r.question, max_new_tokens=TOKENS, method="full")
    blend = held.vllm.generate(r.chunks, r.question, max_new_tokens=TOKENS, config=BlendConfig(recompute_ratio=1.0))
    assert full.stats.engine_cached_tokens == 0 and blend.stats.engine_cached_tokens == blend.stats.tokens_total - 1
    assert blend.token_ids == full.token_ids


@pytest.mark.parametrize("lost", [1, 2])
def test_chunk_deleted_after_precompute_is_computed_fresh(held, lost):
    """A chunk gone from the store when the worker looks it up becomes fresh text there: the
    transformers engine's tokens under the same miss. On record 1, losing chunk 2 changes the
    blend's tokens (so the stale chunk was not used) and losing chunk 1 leaves them unlike a full
    prefill's (so the worker still blended)."""
    kb, r = held.kb, held.records[1]
    present = hf_tokens(held, r)
    kb.store.serialized[0].path(kb.key_for(kb.builder.encode(r.chunks[lost]))).unlink()  # the disk tier, the only one
    try:
        result = held.vllm.generate(r.chunks, r.question, max_new_tokens=TOKENS, config=BLEND)
        expected = kb.generate(r.chunks, r.question, max_new_tokens=TOKENS, config=BLEND)
        assert expected.stats.chunk_misses == 1 and expected.stats.chunk_hits == 2
        assert result.stats.reused == expected.stats.reused and result.stats.tokens_recomputed == expected.stats.tokens_recomputed
        assert result.stats.engine_cached_tokens == result.stats.tokens_total - 1
        assert result.token_ids == expected.token_ids
        if lost == 2:
            assert expected.token_ids != present
        else:
            assert expected.token_ids != hf_tokens(held, r, "full")
    finally:
        kb.precompute(r.chunks)


def test_request_without_a_plan_in_the_same_batch_is_untouched(held):
    """In one batch, a blended request and one none of whose chunks is stored (no plan: vLLM
    prefills it) each get their own tokens: the blend's and vLLM's full prefill's."""
    r = held.records[1]
    unstored = (["The lighthouse keeper painted the stairs green in spring and red again in autumn."], r.question)
    blended, plain = held.vllm.generate_many([(r.chunks, r.question), unstored], max_new_tokens=TOKENS, config=BLEND)
    assert plain.stats.engine_cached_tokens == 0
    assert plain.token_ids == held.vllm.generate(*unstored, max_new_tokens=TOKENS, method="full").token_ids
    assert blended.token_ids == hf_tokens(held, r)


def test_the_store_is_the_servers_not_the_requests(tmp_path):
    """A plan names no store (a client writing `kv_transfer_params` itself could otherwise make the
    worker open any folder or Redis URL): the worker's blender reads the store of the connector's
    config, and a plan reaching a connector configured without one fails (vLLM recomputes it)."""
    from kvblend.engines.vllm import connector_config
    from kvblend.engines.vllm_blend import WorkerBlender, make_plan

    kb = KVBlend(model=str(make_tiny_model(tmp_path / "llama", "llama")), store=str(tmp_path / "store"))
    plan = make_plan(kb, kb.build_prompt(["The lamp burns all night."], "How long?"), kb.config.blend)
    assert "store" not in plan
    extra = connector_config(kb.config.store)["kv_connector_extra_config"]
    assert StoreConfig.model_validate(extra["store"]) == kb.config.store
    assert "store" not in connector_config(None)["kv_connector_extra_config"]
    with pytest.raises(RuntimeError, match="connector has no store"):
        WorkerBlender(None).fused_kv(plan)


def test_a_plan_the_worker_cannot_blend_is_recomputed_by_vllm(tmp_path):
    """The scheduler side reports a planned prompt's tokens as computed externally; when the worker's
    blend fails (here: a connector configured without a store), it reports those blocks failed and
    vLLM recomputes them: the answer is vLLM's own full prefill's, not decoded from unwritten blocks."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvblend.engines.vllm import connector_config
    from kvblend.engines.vllm_blend import PLAN, REPORT_PARAM, blend_salt, make_plan
    from kvblend.engines.vllm_plugin import LOAD_FORMAT

    folder = make_tiny_model(tmp_path / "llama", "llama", head_dim=64, heads=4, kv_heads=2)
    kb = KVBlend(model=str(folder), store=str(tmp_path / "store"))
    chunks = ["Alice keeps the spare key under the blue flowerpot.", "The train to Lyon leaves at seven in the morning."]
    kb.precompute(chunks)
    kb.store.flush()
    prompt = kb.build_prompt(chunks, "Where is the spare key?")
    plan = make_plan(kb, prompt, BLEND)
    llm = LLM(model=str(folder), dtype="float32", seed=0, load_format=LOAD_FORMAT, enforce_eager=True, max_model_len=1024,
              kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False,
              kv_transfer_config=KVTransferConfig(**connector_config(None)))
    try:
        greedy = dict(max_tokens=TOKENS, temperature=0)
        planned = llm.generate(TokensPrompt(prompt_token_ids=prompt.ids, cache_salt=blend_salt(plan["id"])),
                               SamplingParams(**greedy, extra_args={"kv_transfer_params": {PLAN: plan}}))
        plain = llm.generate(TokensPrompt(prompt_token_ids=prompt.ids), SamplingParams(**greedy))
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert list(planned[0].outputs[0].token_ids) == list(plain[0].outputs[0].token_ids)
    assert planned[0].kv_transfer_params == {REPORT_PARAM: {}}  # no blend to report: vLLM recomputed it


def test_the_planning_process_holds_no_weights(held):
    """The process that plans (kvblend serve's API server, the offline engine's caller) loads no
    transformers weights: one copy of the model, vLLM's. Its chunk keys, computed from the
    checkpoint's files, are the ones the loaded model gives, so the worker finds the chunks."""
    from kvblend.engines.vllm import prepare

    planner = KVBlend(config=held.kb.config, lazy_weights=True)
    r = held.records[0]
    planned = prepare(planner, r.chunks, r.question, "blend", BLEND, 4096)
    assert [key for _, _, key in planned.plan["spans"]] == [held.kb.key_for(held.kb.builder.encode(c)) for c in r.chunks]
    assert planned.stats.chunk_hits == 3 and planner.stop_ids == held.kb.stop_ids
    assert not planner.weights_loaded
    planner.close()
