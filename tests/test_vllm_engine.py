"""vLLM engine on a tiny random model (fp32, CPU): vLLM's worker blends each plan on its own weights
and gives the transformers engine's tokens; failures, batches and prefix caching never serve wrong KV.

One `LLM` for the module, eager (no torch.compile at start-up). Skipped where vLLM is not installed.
"""
import os
import tempfile

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'kvblend[vllm]', see docs/vllm.md)")

from tiny import make_tiny_model  # noqa: E402

from kvblend import BlendConfig, KVBlend  # noqa: E402
from kvblend.config import KVBlendConfig  # noqa: E402
from kvblend.engines.vllm import VLLMEngine, prepare  # noqa: E402
from kvblend.engines.vllm_blend import PLAN  # noqa: E402
from kvblend.store import MemoryStore, StoreConfig  # noqa: E402

CHUNKS = [
    "Alice keeps the spare key under the blue flowerpot by the back door of the old house.",
    "The train to Lyon leaves at seven in the morning; the one to Turin leaves at nine.",
    "Bob's favourite number is forty-two, and he writes it on the corner of every page.",
    "The lighthouse keeper painted the stairs green in spring and red again in autumn.",
]
QUESTION = "Where is the spare key?"
TOKENS = 12


def tiny_kb(root) -> KVBlend:
    """A tiny model over a disk-only store (vLLM's worker opens the same folder), chunks precomputed."""
    folder = make_tiny_model(root / "llama", "llama", head_dim=64, heads=4, kv_heads=2)
    store = StoreConfig(disk_dir=str(root / "store"), cpu_bytes=0, codec="raw", async_writes=False)
    kb = KVBlend(model=str(folder), config=KVBlendConfig(store=store))
    kb.precompute(CHUNKS)
    return kb


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    kb = tiny_kb(tmp_path_factory.mktemp("tiny_vllm"))
    with VLLMEngine(kb, kv_cache_bytes=64 << 20, max_model_len=1024, enforce_eager=True) as eng:
        yield eng
    kb.close()


def vllm(engine):
    """The engine's KVBlend answering through vLLM (its own `kb` answers through transformers)."""
    return engine.kb.with_engine(engine)


def hf_tokens(kb, chunks, method="blend", config=None):
    return kb.generate(chunks, QUESTION, max_new_tokens=TOKENS, method=method, config=config).token_ids


def generate_planned(engine, chunks, salted: bool = True, **sampling):
    """Send one planned request straight to vLLM (as a client writing kv_transfer_params would)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    p = prepare(engine.kb, chunks, QUESTION, "blend", None, engine.max_model_len)
    salt = {"cache_salt": p.salt()} if salted else {}
    params = SamplingParams(**({"max_tokens": TOKENS, "temperature": 0} | sampling),
                            extra_args={"kv_transfer_params": {PLAN: p.plan}})
    return engine.llm.generate([TokensPrompt(prompt_token_ids=p.ids, **salt)], params, use_tqdm=False)[0]


@pytest.mark.parametrize("method", ["blend", "full", "reuse"])
def test_vllm_gives_the_hf_engine_tokens(engine, method):
    """Invariant 5 through vLLM: same greedy tokens as transformers from the same fused KV."""
    chunks = CHUNKS[::-1]
    result = vllm(engine).generate(chunks, QUESTION, max_new_tokens=TOKENS, method=method)
    assert result.token_ids == hf_tokens(engine.kb, chunks, method)
    blended = method != "full"  # every prompt token but the last came from the worker's blend
    assert result.stats.engine_cached_tokens == (result.stats.tokens_total - 1 if blended else 0)
    assert result.stats.ttft_s > 0


def test_full_recompute_blend_gives_full_prefill_tokens(engine):
    """Invariant 1 through vLLM: r = 1 reproduces vLLM's own full prefill."""
    full = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, method="full")
    blend = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, config=BlendConfig(recompute_ratio=1.0))
    assert blend.stats.engine_cached_tokens > 0
    assert blend.token_ids == full.token_ids


def test_chunk_damaged_on_disk_after_planning_is_recomputed(engine):
    """A chunk whose file fails its checksum when the worker reads it becomes fresh text there: the
    transformers engine's tokens under the same fault, and the worker reports the miss."""
    kb = engine.kb
    path = kb.store.serialized[0].path(kb.key_for(kb.builder.encode(CHUNKS[1])))
    try:
        with open(path, "r+b") as f:
            f.seek(-64, os.SEEK_END)  # inside the last layer
            f.write(b"\xff" * 8)
        result = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS)
        assert result.stats.chunk_misses == 1 and result.stats.reused == [True, False, True, True]
        assert result.stats.engine_cached_tokens == result.stats.tokens_total - 1
        assert result.token_ids == hf_tokens(kb, CHUNKS)  # the damaged file is a miss here too
    finally:
        path.unlink(missing_ok=True)
        kb.precompute(CHUNKS)


def test_a_plan_for_other_tokens_is_ignored(engine):
    """A plan serves only a prompt that starts with its tokens: sent with another prompt, vLLM prefills."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    p = prepare(engine.kb, CHUNKS, QUESTION, "blend", None, engine.max_model_len)
    other = engine.kb.build_prompt(CHUNKS[::-1], QUESTION).ids
    params = SamplingParams(max_tokens=TOKENS, temperature=0, extra_args={"kv_transfer_params": {PLAN: p.plan}})
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=other)], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and list(out.outputs[0].token_ids) == hf_tokens(engine.kb, CHUNKS[::-1], "full")


def test_requests_forked_from_one_are_each_blended(engine):
    """n = 2: vLLM forks the request and both forks carry the plan; each fork decodes a correct
    cache (the blend's, or vLLM's prefill where it had to recompute), never another prompt's."""
    out = generate_planned(engine, CHUNKS, n=2, temperature=1.0, top_k=1, seed=0)  # greedy: vLLM refuses n > 1 at temperature 0
    blend, full = hf_tokens(engine.kb, CHUNKS, "blend"), hf_tokens(engine.kb, CHUNKS, "full")
    forks = [list(o.token_ids) for o in out.outputs]
    assert blend != full
    assert blend in forks and all(f in (blend, full) for f in forks)


def test_concurrent_requests_each_get_their_own_cache(engine):
    """8 distinct blended prompts at once (blended in the same steps) give the tokens each gives alone."""
    requests = [([CHUNKS[(i + j) % 4] for j in range(1 + i % 4)], f"Question {i}: {QUESTION}") for i in range(8)]
    together = vllm(engine).generate_many(requests, max_new_tokens=TOKENS)
    alone = [vllm(engine).generate(c, q, max_new_tokens=TOKENS) for c, q in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in alone}) > 1
    assert all(r.stats.engine_cached_tokens == r.stats.tokens_total - 1 for r in together)


def test_prompt_over_the_kv_cache_gets_vllms_error(engine):
    from vllm.exceptions import VLLMValidationError

    long_chunks = [c * 6 for c in CHUNKS]
    engine.kb.precompute(long_chunks)
    with pytest.raises(VLLMValidationError, match="maximum context length"):
        vllm(engine).generate(long_chunks, QUESTION, max_new_tokens=TOKENS)


def test_a_request_blended_again_reports_only_its_last_blend():
    """The scheduler side keeps a request's blend report until it finishes; a request preempted and
    blended again whose second blend fails (vLLM recomputes it) reports no blend, not its first one."""
    from types import SimpleNamespace

    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvblend.engines.vllm import connector_config
    from kvblend.engines.vllm_blend import REPORT_PARAM
    from kvblend.engines.vllm_connector import BlendReports, KVBlendConnector, LoadSpec

    config = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
                             kv_transfer_config=KVTransferConfig(**connector_config(None)),
                             cache_config=SimpleNamespace(block_size=16, enable_prefix_caching=False))
    connector = KVBlendConnector(config, KVConnectorRole.SCHEDULER, None)
    nothing_cached = SimpleNamespace(req_ids=[], new_block_ids=[])

    def step(new=(), resumed=(), reports=None):
        """One scheduler step: loads handed out for `new` and `resumed` requests, then the worker's output."""
        out = SimpleNamespace(
            scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=([0, 1],)) for r in new],
            scheduled_cached_reqs=SimpleNamespace(req_ids=list(resumed), new_block_ids=[([2, 3],)] * len(resumed))
            if resumed else nothing_cached)
        meta = connector.build_connector_meta(out)
        connector.update_connector_output(SimpleNamespace(kv_connector_worker_meta=BlendReports(reports) if reports else None))
        return [spec.req_id for spec in meta.loads]

    first = {"tokens_recomputed": 5}
    connector._loads["r"] = LoadSpec("r", "plan-id", 0, 20, {"id": "plan-id"})
    assert step(new=["r"], reports={"r": first}) == ["r"]
    connector._loads["r"] = LoadSpec("r", "plan-id", 0, 20, {"id": "plan-id"})  # preempted, its blocks allocated again
    assert step(resumed=["r"]) == ["r"]  # blended again, and that blend failed: no report
    assert connector.request_finished(SimpleNamespace(request_id="r"), [])[1] == {REPORT_PARAM: {}}
    connector._loads["s"] = LoadSpec("s", "plan-2", 0, 20, {"id": "plan-2"})
    step(new=["s"], reports={"s": first})
    assert connector.request_finished(SimpleNamespace(request_id="s"), [])[1] == {REPORT_PARAM: first}


def test_vllm_workers_run_on_tcmalloc(engine):
    """vLLM's CPU guide asks for tcmalloc in its workers; the engine preloads the system's copy."""
    import ctypes.util

    import psutil

    if ctypes.util.find_library("tcmalloc_minimal") is None:
        pytest.skip("libtcmalloc_minimal is not installed here (Debian: libtcmalloc-minimal4; CI installs it)")

    assert "libtcmalloc" in os.environ.get("LD_PRELOAD", "")
    children = psutil.Process().children(recursive=True)
    maps = [open(f"/proc/{p.pid}/maps").read() for p in children if p.is_running()]
    assert maps and any("libtcmalloc" in m for m in maps)


def test_vllm_workers_put_weights_on_huge_pages(engine):
    """Like kvblend's own weights, the workers' torch allocations get transparent huge pages."""
    import psutil

    from huge import huge_bytes, huge_pages_allowed

    assert os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    most = max(huge_bytes(p.pid) for p in psutil.Process().children(recursive=True) if p.is_running())
    # a worker holds the model's weights (the engine here: a tiny model, 2 MB tensors and up qualify)
    assert most > 0 if huge_pages_allowed() else most == 0


def test_blended_kv_never_serves_an_exact_request(tmp_path_factory):
    """With vLLM's prefix caching on, an exact (full) request after a blend of the same prompt does not
    reuse the blended blocks (it gets full prefill's tokens), while exact requests still share
    theirs; a plan sent without its salt is ignored."""
    kb = tiny_kb(tmp_path_factory.mktemp("tiny_prefix"))
    expected = hf_tokens(kb, CHUNKS, "full")
    assert hf_tokens(kb, CHUNKS, "blend") != expected  # a leak would show in the tokens too
    with VLLMEngine(kb, kv_cache_bytes=64 << 20, max_model_len=1024, prefix_caching=True, enforce_eager=True) as eng:
        on_vllm = kb.with_engine(eng)
        blended = on_vllm.generate(CHUNKS, QUESTION, max_new_tokens=TOKENS)
        assert blended.stats.engine_cached_tokens == blended.stats.tokens_total - 1
        exact = on_vllm.generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, method="full")
        assert exact.stats.engine_cached_tokens == 0 and exact.token_ids == expected
        again = on_vllm.generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, method="full")
        assert again.stats.engine_cached_tokens > 0 and again.token_ids == expected  # exact blocks are shared
        unsalted = generate_planned(eng, CHUNKS[::-1], salted=False)
        assert list(unsalted.outputs[0].token_ids) == hf_tokens(kb, CHUNKS[::-1], "full")
    kb.close()


def test_the_engine_needs_a_store_its_worker_can_open(tmp_path, monkeypatch):
    """KVBlend(engine="vllm") over a memory-only store gives it a temporary disk tier, which the
    worker opens and close() removes; a store object (invisible to the worker) is refused before
    vLLM starts."""
    import kvblend.engines.vllm as vllm_engine

    model = str(make_tiny_model(tmp_path / "llama", "llama"))
    with KVBlend(model=model, store=MemoryStore()) as kb, pytest.raises(ValueError, match="disk or remote tier"):
        VLLMEngine(kb)

    class Recorder:  # stands in for the engine: no vLLM start
        def __init__(self, kb):
            self.store = kb.config.store

        def warm(self, texts):
            pass

        def close(self):
            pass

    monkeypatch.setattr(vllm_engine, "VLLMEngine", Recorder)
    kb = KVBlend(model=model, engine="vllm")
    folder = kb.engine.store.disk_dir
    assert folder and os.path.isdir(folder) and kb.config.store.disk_dir == folder and not kb.weights_loaded
    assert kb.config.store.disk_bytes == kb.config.store.cpu_bytes > 0 and kb.config.store.codec == "raw"
    kb.precompute(CHUNKS[:1])
    kb.store.flush()
    assert kb.store.contains(kb.key_for(kb.builder.encode(CHUNKS[0])))
    assert kb.store.memory == [] and any(os.scandir(folder))  # this process keeps no memory tier: the chunk is on disk
    kb.close()
    assert not os.path.exists(folder)
    with KVBlend(model=model) as kb:
        assert kb.config.store.disk_dir is None  # the hf engine keeps a memory store

    monkeypatch.setattr(vllm_engine, "VLLMEngine", lambda kb: 1 / 0)  # vLLM fails to start
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(ZeroDivisionError):
        KVBlend(model=model, engine="vllm")
    assert {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("kvblend-store-")} == set()


def test_vllm_cpu_workers_get_every_core_unless_the_user_chose(monkeypatch):
    """Without a binding, vLLM's CPU worker reserves cores for its scheduler: the baselines would run
    on fewer cores than the blend."""
    from kvblend.engines.vllm import tune_worker_environment

    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.delenv(name, raising=False)
    cores = sorted(os.sched_getaffinity(0))
    tune_worker_environment()
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    tune_worker_environment(threads=1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0" and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    tune_worker_environment(threads=1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == str(cores[0])
