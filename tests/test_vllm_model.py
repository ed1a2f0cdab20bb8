"""kvblend's blend inside vLLM's worker, on the modules and weights vLLM loaded (docs/vllm.md).

vLLM (CPU, fp32, eager) loads a model through kvblend's `kvblend` load format (the
`vllm.general_plugins` entry point); a function sent with `LLM.collective_rpc` runs in the worker,
takes `worker_model()` and runs kvblend's `encode_chunk` and `BlendExecutor` there. Compared with
the transformers side (`LayerwiseModel`) on the same prompt: two cached chunks and a question.
Run on the real default model (Llama) and on tiny Qwen2 (QKV bias) and Qwen3 (q/k norms) models.
"""
import json
from contextlib import contextmanager

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'kvblend[vllm]', see docs/vllm.md)")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from kvblend.blend.chunks import encode_chunk  # noqa: E402
from kvblend.blend.executor import BlendExecutor, CachedSpan  # noqa: E402
from kvblend.config import BlendConfig  # noqa: E402
from kvblend.engines.hf import full_prefill  # noqa: E402
from kvblend.engines.vllm_plugin import LOAD_FORMAT, worker_model  # noqa: E402
from kvblend.models import LayerwiseModel, resolve_model  # noqa: E402
from kvblend.store.base import ChunkKV  # noqa: E402
from tiny import make_tiny_model  # noqa: E402

CONFIGS = {"full": dict(recompute_ratio=1.0), "blend": dict(recompute_ratio=0.15), "reuse": dict(recompute_ratio=0.0, check_layers=[])}
LOGIT_TOL = 5e-4  # fp32, vLLM's kernels (oneDNN GEMMs, its RMSNorm) against torch's: measured ~7e-5 over 30 layers
KV_TOL = 5e-4  # measured ~6e-5 on keys up to ~25


class Held:
    """Holds the `LLM` (whose repr, which pytest takes for a failure report, is an RPC to the engine)."""

    def __init__(self, llm):
        self.llm = llm


@contextmanager
def started(folder: str, max_model_len: int):
    """vLLM's `LLM` on `folder` through the kvblend load format (CPU, fp32, eager, a small KV cache)."""
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc ships the test's function to the worker
        llm = LLM(model=folder, dtype="float32", load_format=LOAD_FORMAT, enforce_eager=True,
                  kv_cache_memory_bytes=128 << 20, max_model_len=max_model_len, seed=0)
        try:
            yield Held(llm)
        finally:
            llm.llm_engine.engine_core.shutdown()


class InterleavedRope:
    """The worker's adapter with its rotary tables in the interleaved-pairs layout (a wrong one):
    the negative control showing LOGIT_TOL tells a right adapter from a wrong one."""

    def __init__(self, m):
        self.m = m

    def __getattr__(self, name):
        return getattr(self.m, name)

    def rope_tables(self, end, start=0):
        cos, sin = self.m.rope_tables(end, start)
        half = cos.shape[-1] // 2
        return cos[:, :half].repeat_interleave(2, -1), sin[:, :half].repeat_interleave(2, -1)


def in_worker(worker, inputs: str, outputs: str) -> None:
    """Runs in vLLM's worker: encode the chunks and blend the prompt on vLLM's modules. Tensors travel
    in files (the RPC's arguments are msgpack, which turns nested tensors into lists)."""
    ids, sent, question_start, context_ids = torch.load(inputs)
    spans = [CachedSpan(start, ChunkKV(key, "", keys, values)) for start, _, (key, keys, values) in sent]
    m = worker_model()
    encoded = [encode_chunk(m, context_ids, chunk_ids, "k") for _, chunk_ids, _ in sent]
    out = {"fingerprint": m.fingerprint, "same_model": m.model is worker.get_model(),
           "encoded": [(kv.keys, kv.values) for kv in encoded]}
    for name, cfg in CONFIGS.items():
        res = BlendExecutor(m).run(ids, spans, question_start, BlendConfig(**cfg))
        out[name] = (res.logits, res.selected)
    out["wrong_rope"] = BlendExecutor(InterleavedRope(m)).run(ids, spans, question_start, BlendConfig(**CONFIGS["full"])).logits
    torch.save(out, outputs)


class Case:
    """A prompt of cached chunks + question, its transformers side, and what vLLM computed for it."""

    def __init__(self, model, adapter: LayerwiseModel, segments: list[tuple[list[int], bool]], context_ids: list[int]):
        self.model, self.adapter, self.context_ids = model, adapter, context_ids
        self.ids = torch.tensor([t for seg, _ in segments for t in seg])
        self.chunks, start = [], 0
        for seg, cached in segments:
            if cached:
                self.chunks.append((start, seg, encode_chunk(adapter, context_ids, seg, f"chunk-{start}")))
            start += len(seg)
        self.question_start = start - len(segments[-1][0])
        self.worker: dict = {}
        self.vllm_prefill = None  # vLLM's own greedy first token and its top log-probabilities

    def run(self, folder: str, max_model_len: int, tmp) -> "Case":
        """Start vLLM on `folder`, run `in_worker` there and vLLM's own prefill of the prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sent = [(start, seg, (kv.key, kv.keys, kv.values)) for start, seg, kv in self.chunks]
        torch.save((self.ids, sent, self.question_start, self.context_ids), tmp / "in.pt")
        with started(folder, max_model_len) as held:
            held.llm.collective_rpc(in_worker, timeout=900, args=(str(tmp / "in.pt"), str(tmp / "out.pt")))
            (out,) = held.llm.generate(TokensPrompt(prompt_token_ids=self.ids.tolist()),
                                       SamplingParams(max_tokens=1, temperature=0.0, logprobs=10), use_tqdm=False)
        self.worker = torch.load(tmp / "out.pt")
        self.vllm_prefill = (out.outputs[0].token_ids[0], {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()})
        return self

    def transformers_blend(self, name: str):
        spans = [CachedSpan(start, kv) for start, _, kv in self.chunks]
        return BlendExecutor(self.adapter).run(self.ids, spans, self.question_start, BlendConfig(**CONFIGS[name]))


def real_case(kb, datasets) -> Case:
    """The real default model (Llama): two chunks of the bundled CacheBlend record 1 and its question (~1,270 tokens)."""
    d = json.loads((datasets / "cacheblend" / "1.json").read_text())
    built = kb.build_prompt([d["0"], d["1"]], d["query"])
    return Case(kb.model, kb.adapter, [(seg.ids, seg.chunk is not None) for seg in built.segments], kb.context_ids)


def tiny_case(folder) -> Case:
    """A tiny random-weight model: head, two chunks and question of random byte tokens."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    part = lambda n: torch.randint(4, 260, (n,), generator=g).tolist()  # noqa: E731
    return Case(model, LayerwiseModel(model), [(part(5), False), (part(90), True), (part(70), True), (part(12), False)], [0])


@pytest.fixture(scope="module", params=[pytest.param("smollm2", marks=pytest.mark.real_model), "qwen2", "qwen3"])
def case(request, tmp_path_factory) -> Case:
    """The real default model, and tiny Qwen2 (QKV bias) and Qwen3 (q/k norms) models."""
    tmp = tmp_path_factory.mktemp(f"rpc_{request.param}")
    if request.param == "smollm2":
        return real_case(request.getfixturevalue("real_kb"), request.getfixturevalue("datasets")).run(
            resolve_model("smollm2-135m"), 2048, tmp)
    folder = make_tiny_model(tmp / "model", request.param, head_dim=64, heads=4, kv_heads=2)
    return tiny_case(folder).run(str(folder), 512, tmp)


def test_the_worker_gets_the_model_vllm_runs(case):
    assert case.worker["same_model"]


def test_fingerprint_matches_the_transformers_side(case):
    assert case.worker["fingerprint"] == case.adapter.fingerprint


def test_chunks_encoded_in_the_worker_match_transformers(case):
    """Every layer's pre-RoPE K and V of each chunk (qkv, attention output and MLP of every layer below)."""
    for (_, _, kv), (keys, values) in zip(case.chunks, case.worker["encoded"]):
        assert (keys - kv.keys).abs().max() < KV_TOL
        assert (values - kv.values).abs().max() < KV_TOL


def test_full_recompute_in_the_worker_gives_full_prefill_logits(case):
    """recompute_ratio=1: the last token's logits are a full prefill's, transformers' and vLLM's own
    (same greedy token, same top log-probabilities); the wrong rotary layout misses them by far
    more than the tolerance."""
    logits = case.worker["full"][0]
    _, reference = full_prefill(case.model, case.ids)
    assert (logits - reference).abs().max() < LOGIT_TOL
    assert (case.worker["wrong_rope"] - reference).abs().max() > 50 * LOGIT_TOL
    token, top = case.vllm_prefill
    ours = torch.log_softmax(logits, -1)
    assert token == int(logits.argmax())
    for t, logprob in top.items():
        assert abs(ours[t].item() - logprob) < LOGIT_TOL, (t, ours[t].item(), logprob)


@pytest.mark.parametrize("name", ["blend", "reuse"])
def test_blend_in_the_worker_matches_the_transformers_blend(case, name):
    """Same chunk caches, same selection, same first token, logits within fp32 noise; and far from a
    full prefill's (so the comparison would catch a blend that quietly recomputed everything)."""
    ref = case.transformers_blend(name)
    logits, selected = case.worker[name]
    assert torch.equal(selected, ref.selected)
    assert int(logits.argmax()) == int(ref.logits.argmax())
    assert (logits - ref.logits).abs().max() < LOGIT_TOL
    assert (logits - case.worker["full"][0]).abs().max() > 50 * LOGIT_TOL


def test_worker_model_outside_a_worker_is_an_error():
    with pytest.raises(RuntimeError, match="load_format"):
        worker_model()
