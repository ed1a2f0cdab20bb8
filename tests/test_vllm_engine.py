"""vLLM engine on a tiny random model (fp32, CPU): the connector hands vLLM exactly the blend's KV.

One `LLM` for the whole module, eager (no torch.compile at start-up). Skipped where vLLM is not installed.
"""
import os
import uuid

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'kvblend[vllm]', see docs/vllm.md)")

from tiny import make_tiny_model  # noqa: E402

from kvblend import BlendConfig, KVBlend  # noqa: E402
from kvblend.engines.hf import full_prefill  # noqa: E402
from kvblend.engines.vllm import VLLMEngine  # noqa: E402
from kvblend.engines.vllm_handoff import PARAM, SPARES, HandoffDir, HandoffHeader, prompt_digest  # noqa: E402
from kvblend.store import MemoryStore, StoreConfig, open_store  # noqa: E402

CHUNKS = [
    "Alice keeps the spare key under the blue flowerpot by the back door of the old house.",
    "The train to Lyon leaves at seven in the morning; the one to Turin leaves at nine.",
    "Bob's favourite number is forty-two, and he writes it on the corner of every page.",
    "The lighthouse keeper painted the stairs green in spring and red again in autumn.",
]
QUESTION = "Where is the spare key?"
TOKENS = 12


def only_spares_left(engine) -> bool:
    """Loaded hand-offs stay as at most SPARES files for reuse; nothing else is left behind."""
    names = [p.name for p in engine.handoff.folder.iterdir()]
    assert all(n.startswith("spare-") for n in names) and len(names) <= SPARES, names
    return True


class FaultyStore(MemoryStore):
    """An in-memory store whose chosen keys read as misses (absent, or damaged and rejected)."""

    def __init__(self):
        super().__init__()
        self.broken: set[str] = set()

    def get(self, key):
        return None if key in self.broken else super().get(key)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_vllm") / "llama", "llama", head_dim=64, heads=4, kv_heads=2)
    kb = KVBlend(model=str(folder), store=FaultyStore())
    kb.precompute(CHUNKS)
    handoff = tmp_path_factory.mktemp("handoff")
    with VLLMEngine(kb, kv_cache_bytes=64 << 20, max_model_len=1024, handoff_dir=str(handoff),
                    save_dir=str(tmp_path_factory.mktemp("saved")), enforce_eager=True) as eng:
        yield eng


def vllm(engine):
    """The engine's KVBlend answering through vLLM (its own `kb` answers through transformers)."""
    return engine.kb.with_engine(engine)


def hf_tokens(kb, chunks, method="blend", config=None):
    return kb.generate(chunks, QUESTION, max_new_tokens=TOKENS, method=method, config=config).token_ids


@pytest.mark.parametrize("method", ["blend", "full", "reuse"])
def test_vllm_gives_the_hf_engine_tokens(engine, method):
    """Invariant 5 through vLLM: same greedy tokens as transformers from the same fused KV."""
    chunks = CHUNKS[::-1]
    result = vllm(engine).generate(chunks, QUESTION, max_new_tokens=TOKENS, method=method)
    assert result.token_ids == hf_tokens(engine.kb, chunks, method)
    blended = method != "full"  # the whole prompt came from the hand-off; vLLM stepped only the first token
    assert result.stats.engine_cached_tokens == (result.stats.tokens_total if blended else 0)
    assert result.stats.ttft_s > 0 and only_spares_left(engine)


def test_full_recompute_blend_gives_full_prefill_tokens(engine):
    """Invariant 1 through vLLM: r = 1 reproduces vLLM's own full prefill."""
    full = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, method="full")
    blend = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, config=BlendConfig(recompute_ratio=1.0))
    assert blend.stats.engine_cached_tokens > 0
    assert blend.token_ids == full.token_ids


def test_missing_or_damaged_chunk_is_recomputed(engine):
    """A chunk the store cannot serve becomes fresh tokens: same tokens as the HF engine under the same fault."""
    kb = engine.kb
    lost = kb.key_for(kb.builder.encode(CHUNKS[1]))
    kb.store.broken.add(lost)
    try:
        result = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS)
        assert result.stats.chunk_misses == 1 and result.stats.chunk_hits == 3
        assert result.token_ids == hf_tokens(kb, CHUNKS)
        assert result.stats.engine_cached_tokens == result.stats.tokens_total
    finally:
        kb.store.broken.clear()


def test_chunk_damaged_on_disk_mid_request_is_recomputed(engine, tmp_path):
    """A layer that fails its checksum while the blend reads it: the chunk is re-encoded, same tokens as clean."""
    kb = engine.kb
    clean = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS).token_ids
    original = kb.store
    kb.store = open_store(StoreConfig(disk_dir=str(tmp_path), cpu_bytes=0))
    try:
        kb.precompute(CHUNKS)
        kb.store.flush()
        with open(kb.store.serialized[0].path(kb.key_for(kb.builder.encode(CHUNKS[1]))), "r+b") as f:
            f.seek(-64, os.SEEK_END)  # inside the last layer
            f.write(b"\xff" * 8)
        result = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS)
        assert result.token_ids == clean and kb.store.serialized[0].stats.corrupt == 1
    finally:
        kb.store.close()
        kb.store = original


def test_first_token_comes_from_the_blend(engine, monkeypatch):
    """The blend's own last-token logits give the first token: one token needs no vLLM request at all;
    sampled, the first token is the HF engine's and the whole answer reproducible under its seed."""
    from kvblend.engines.sampling import Sampling

    submitted = []
    add_request = engine.llm.llm_engine.add_request
    monkeypatch.setattr(engine.llm.llm_engine, "add_request", lambda *a, **k: submitted.append(a[0]) or add_request(*a, **k))
    one = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=1)
    assert one.token_ids == hf_tokens(engine.kb, CHUNKS)[:1] and not submitted
    assert one.stats.engine_cached_tokens == 0 and one.stats.decode_s == 0.0 and only_spares_left(engine)
    stop_ids = engine.kb.stop_ids
    monkeypatch.setattr(engine.kb, "stop_ids", stop_ids | {one.token_ids[0]})  # a first token that stops
    stopped = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS)
    assert stopped.token_ids == one.token_ids and not submitted and only_spares_left(engine)
    monkeypatch.setattr(engine.kb, "stop_ids", stop_ids)
    hot = Sampling(temperature=0.9, seed=3)
    first, again = (vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, sampling=hot) for _ in range(2))
    assert len(submitted) == 2 and first.token_ids == again.token_ids  # seeded: reproducible
    assert first.token_ids[0] == engine.kb.generate(CHUNKS, QUESTION, max_new_tokens=1, sampling=hot).token_ids[0]


def test_handoff_of_a_prompt_prefix_serves_those_tokens(engine):
    """A hand-off holds the KV of the tokens a prompt starts with: vLLM takes those and computes the
    rest; a hand-off of other tokens is ignored (vLLM prefills everything)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = engine.kb.build_prompt(CHUNKS, QUESTION).ids
    cache, _ = full_prefill(engine.kb.model, torch.tensor(ids))
    full = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, method="full").token_ids
    for covered, digest, cached in [(len(ids) - 6, prompt_digest(ids[:-6]), len(ids) - 6), (20, prompt_digest(ids[1:21]), 0)]:
        key = uuid.uuid4().hex
        engine.handoff.save(key, HandoffHeader(covered, digest), [x.keys[0, :, :covered] for x in cache.layers],
                            [x.values[0, :, :covered] for x in cache.layers])
        params = SamplingParams(max_tokens=TOKENS, temperature=0, extra_args={"kv_transfer_params": {PARAM: key}})
        out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        engine.handoff.remove(key)
        assert out.num_cached_tokens == cached and list(out.outputs[0].token_ids) == full


def test_unreadable_handoff_makes_vllm_recompute(engine):
    """A hand-off that passes the scheduler's check but fails in the worker: vLLM recomputes the blocks."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = engine.kb.build_prompt(CHUNKS, QUESTION).ids
    pre = engine.kb.prefill(CHUNKS, QUESTION, "full")
    layers = pre.cache.layers[:2]  # too few layers: the worker fails at layer 2
    key = "ab" * 16
    engine.handoff.save(key, HandoffHeader(len(ids) - 1, prompt_digest(ids[:-1])),
                        [x.keys[0] for x in layers], [x.values[0] for x in layers])
    params = SamplingParams(max_tokens=TOKENS, temperature=0, extra_args={"kv_transfer_params": {PARAM: key}})
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    full = vllm(engine).generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, method="full")
    assert list(out.outputs[0].token_ids) == full.token_ids


def test_requests_forked_from_one_share_its_handoff(engine):
    """n = 2: vLLM forks the request and both forks carry the hand-off key. Forks loaded in the same
    step share the file (it is reused only after the step); a fork scheduled later finds it gone and
    vLLM recomputes it. Either way each fork decodes a correct cache, never another prompt's."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvblend.engines.vllm import prepare

    p = prepare(engine.kb, engine.handoff, CHUNKS, QUESTION, "blend", None, engine.max_model_len)
    params = SamplingParams(n=2, max_tokens=TOKENS, temperature=1.0, top_k=1, seed=0,  # greedy: vLLM refuses n > 1 at temperature 0
                            extra_args={"kv_transfer_params": {PARAM: p.handoff_key}})
    try:
        out = engine.llm.generate([TokensPrompt(prompt_token_ids=p.ids)], params, use_tqdm=False)[0]
    finally:
        engine.handoff.remove(p.handoff_key)
    blend, full = hf_tokens(engine.kb, CHUNKS, "blend"), hf_tokens(engine.kb, CHUNKS, "full")
    forks = [list(o.token_ids) for o in out.outputs]
    assert blend != full
    assert blend in forks and all(f in (blend, full) for f in forks)
    assert only_spares_left(engine)


def test_concurrent_requests_each_get_their_own_cache(engine):
    """8 distinct blended prompts at once give the tokens each gives alone."""
    requests = [([CHUNKS[(i + j) % 4] for j in range(1 + i % 4)], f"Question {i}: {QUESTION}") for i in range(8)]
    together = vllm(engine).generate_many(requests, max_new_tokens=TOKENS)
    alone = [vllm(engine).generate(c, q, max_new_tokens=TOKENS) for c, q in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in alone}) > 1
    assert all(r.stats.engine_cached_tokens == r.stats.tokens_total for r in together)
    assert only_spares_left(engine) and any(engine.handoff.folder.glob("spare-*"))  # loaded files kept for reuse


def test_prompt_over_the_kv_cache_gets_vllms_error(engine):
    from vllm.exceptions import VLLMValidationError

    long_chunks = [c * 6 for c in CHUNKS]
    engine.kb.precompute(long_chunks)
    with pytest.raises(VLLMValidationError, match="maximum context length"):
        vllm(engine).generate(long_chunks, QUESTION, max_new_tokens=TOKENS)
    assert only_spares_left(engine)


def test_saved_prompt_kv_matches_transformers(engine):
    """The optional save path reads vLLM's paged cache back (layout probed with vLLM's own write)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = engine.kb.build_prompt(CHUNKS[:2], QUESTION).ids
    params = SamplingParams(max_tokens=1, temperature=0, extra_args={"kv_transfer_params": {"kvblend_save": True}})
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    key = out.kv_transfer_params["kvblend_saved"]
    saved = HandoffDir(engine.save_dir)
    assert saved.header(key) == HandoffHeader(len(ids) - 1, prompt_digest(ids[:-1]))
    cache, _ = full_prefill(engine.kb.model, torch.tensor(ids))
    with saved.open(key) as reader:
        for i, layer in enumerate(cache.layers):
            torch.testing.assert_close(reader.get_tensor(f"k.{i}"), layer.keys[0, :, :-1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(reader.get_tensor(f"v.{i}"), layer.values[0, :, :-1], atol=1e-4, rtol=1e-4)


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
    theirs; a hand-off named without its salt is ignored."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvblend.engines.vllm import prepare

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_prefix") / "llama", "llama", head_dim=64, heads=4, kv_heads=2)
    kb = KVBlend(model=str(folder), store=MemoryStore())
    kb.precompute(CHUNKS)
    expected = hf_tokens(kb, CHUNKS, "full")
    assert hf_tokens(kb, CHUNKS, "blend") != expected  # a leak would show in the tokens too
    with VLLMEngine(kb, kv_cache_bytes=64 << 20, max_model_len=1024, handoff_dir=str(tmp_path_factory.mktemp("handoff_prefix")),
                    prefix_caching=True, enforce_eager=True) as eng:
        on_vllm = kb.with_engine(eng)
        blended = on_vllm.generate(CHUNKS, QUESTION, max_new_tokens=TOKENS)
        assert blended.stats.engine_cached_tokens == blended.stats.tokens_total
        exact = on_vllm.generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, method="full")
        assert exact.stats.engine_cached_tokens == 0 and exact.token_ids == expected
        again = on_vllm.generate(CHUNKS, QUESTION, max_new_tokens=TOKENS, method="full")
        assert again.stats.engine_cached_tokens > 0 and again.token_ids == expected  # exact blocks are shared

        p = prepare(kb, eng.handoff, CHUNKS[::-1], QUESTION, "blend", None, eng.max_model_len)
        params = SamplingParams(max_tokens=TOKENS, temperature=0, extra_args={"kv_transfer_params": {PARAM: p.handoff_key}})
        try:
            out = eng.llm.generate([TokensPrompt(prompt_token_ids=p.ids)], params, use_tqdm=False)[0]  # no salt
        finally:
            eng.handoff.remove(p.handoff_key)
        assert list(out.outputs[0].token_ids) == hf_tokens(kb, CHUNKS[::-1], "full")


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
