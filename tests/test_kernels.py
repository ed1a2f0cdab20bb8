"""Every Triton kernel against its torch reference, and the blend executor with backend="triton".

With no GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by the autouse fixture
before the kernel modules are first imported), so shapes stay small and blocks large. Tolerances:
fp32 1e-5; fp16 2e-3; bf16 2e-2 (≈2 ulps: the reference rounds after every bf16 op, the kernels
compute in fp32, and the interpreter truncates fp32→bf16 stores where a GPU rounds to nearest).
The deviation is an fp32 sum of exactly upcast inputs in every dtype, so it is held to 1e-5.
"""
from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch

pytest.importorskip("triton")

from kvblend.kernels import kv_deviation, plan_attention, rope_realign, rope_realign_span, scatter_rows, selected_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter_without_gpu():
    """Run the kernels in Triton's interpreter on CPU; @triton.jit reads the flag at import."""
    if DEVICE == "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def heads_first(tokens: int, heads: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[heads, tokens, dim] as a transposed view of [tokens, heads, dim], like the model adapter's q/k/v."""
    return randn(tokens, heads, dim, dtype=dtype, seed=seed).transpose(0, 1)


def sorted_subset(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values.to(DEVICE)


def rope_tables(n: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style duplicated-halves cos/sin tables [n, dim]."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim)
    angles = torch.outer(torch.arange(n).double(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


# kv_heads, tokens, head_dim, buffer rows (None: return the rotated keys)
ROPE_CASES = [(1, 37, 64, 90), (3, 50, 128, 61), (2, 21, 64, None), (8, 1, 128, None), (2, 0, 64, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads,tokens,dim,rows", ROPE_CASES)
def test_rope_realign(dtype, kv_heads, tokens, dim, rows):
    keys = heads_first(tokens, kv_heads, dim, dtype, seed=1)
    cos, sin = randn(128, dim, dtype=dtype, seed=20), randn(128, dim, dtype=dtype, seed=21)  # not HF's duplicated halves: every column counts
    positions = sorted_subset(rows or 128, tokens, seed=2)
    results = {}
    for backend in ("torch", "triton"):
        out = None if rows is None else randn(kv_heads, rows, dim, dtype=dtype, seed=3)
        results[backend] = rope_realign(keys, cos, sin, positions, out=out, backend=backend)
    assert_close(results["triton"], results["torch"], dtype)


def test_rope_realign_rotates_a_chunk_into_a_bigger_cache_dtype():
    """A bf16 chunk realigned into an fp32 buffer at a contiguous span, as a chunk placed mid-prompt."""
    keys = randn(2, 33, 64, dtype=torch.bfloat16, seed=4)
    cos, sin = rope_tables(100, 64, torch.float32)
    positions = torch.arange(40, 73, device=DEVICE)
    out = {b: rope_realign(keys, cos, sin, positions, out=torch.zeros(2, 100, 64, device=DEVICE), backend=b) for b in ("torch", "triton")}
    assert_close(out["triton"], out["torch"], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rope_realign_span_matches_the_gathered_realign(dtype, backend):
    """The in-place span path (the executor's per-chunk realign) equals the position-gather path
    and leaves every row outside the span untouched."""
    keys = randn(3, 29, 64, dtype=dtype, seed=5)
    cos, sin = rope_tables(100, 64, dtype)
    before = randn(3, 100, 64, dtype=dtype, seed=6)
    expected = rope_realign(keys, cos, sin, torch.arange(50, 79, device=DEVICE), out=before.clone(), backend="torch")
    actual = rope_realign_span(keys, cos, sin, 50, out=before.clone(), backend=backend)
    assert_close(actual, expected, dtype)
    assert torch.equal(actual[:, :50], before[:, :50]) and torch.equal(actual[:, 79:], before[:, 79:])


# kv_heads, tokens, head_dim
DEVIATION_CASES = [(1, 37, 64), (8, 19, 128), (3, 1, 64), (2, 0, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads,tokens,dim", DEVIATION_CASES)
def test_kv_deviation(dtype, kv_heads, tokens, dim):
    fresh = heads_first(tokens, kv_heads, dim, dtype, seed=5)
    cached = randn(kv_heads, tokens, dim, dtype=dtype, seed=6)
    got = kv_deviation(fresh, cached, backend="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, kv_deviation(fresh, cached, backend="torch"), atol=1e-5, rtol=1e-5)


# kv_heads, rows written, buffer rows, head_dim: some rows, all rows (a permutation), none
SCATTER_CASES = [(1, 13, 40, 64), (3, 31, 31, 128), (8, 5, 9, 64), (2, 0, 20, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads,n_rows,n_buffer,dim", SCATTER_CASES)
def test_scatter_rows(dtype, kv_heads, n_rows, n_buffer, dim):
    src = heads_first(n_rows, kv_heads, dim, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    rows = torch.randperm(n_buffer, generator=g)[:n_rows].to(DEVICE)
    out = {b: scatter_rows(src, randn(kv_heads, n_buffer, dim, dtype=dtype, seed=9), rows, backend=b) for b in ("torch", "triton")}
    torch.testing.assert_close(out["triton"], out["torch"], atol=0, rtol=0)


def test_scatter_rows_casts_to_the_buffer_dtype():
    src = randn(2, 7, 64, seed=10)
    rows = sorted_subset(16, 7, seed=11)
    out = {b: scatter_rows(src, torch.zeros(2, 16, 64, dtype=torch.float16, device=DEVICE), rows, backend=b) for b in ("torch", "triton")}
    assert_close(out["triton"], out["torch"], torch.float16)


# heads, kv_heads, head_dim, keys, selection: GQA ratios 1/3/8 with 1 and several KV heads,
# queries at random positions, every position (full causal), only the last (decode-like), a tail
# starting at 62 (its first key tile is partly masked: the unmasked/masked split is exact)
ATTENTION_CASES = [
    (1, 1, 64, 37, "random"),
    (6, 2, 64, 53, "random"),
    (8, 1, 128, 150, "random"),
    (24, 3, 128, 45, "all"),
    (6, 2, 64, 203, "last"),
    (4, 4, 128, 131, "all"),
    (2, 1, 64, 100, "tail"),
]


def select(selection: str, n_keys: int) -> torch.Tensor:
    if selection == "all":
        return torch.arange(n_keys, device=DEVICE)
    if selection == "last":
        return torch.tensor([n_keys - 1], device=DEVICE)
    if selection == "tail":
        return torch.arange(62, n_keys, device=DEVICE)
    picked = sorted_subset(n_keys - 1, int(0.4 * n_keys), seed=16)
    return torch.cat([picked, torch.tensor([n_keys - 1], device=DEVICE)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,dim,n_keys,selection", ATTENTION_CASES)
def test_selected_attention(dtype, heads, kv_heads, dim, n_keys, selection):
    q_pos = select(selection, n_keys)
    q = heads_first(q_pos.numel(), heads, dim, dtype, seed=17)
    k = randn(kv_heads, n_keys, dim, dtype=dtype, seed=18)
    v = heads_first(n_keys, kv_heads, dim, dtype, seed=19)
    plan = plan_attention(q_pos, n_keys, heads // kv_heads)
    got = selected_attention(q, k, v, plan, dim**-0.5, backend="triton")
    assert got.is_contiguous()
    assert_close(got, selected_attention(q, k, v, plan, dim**-0.5, backend="torch"), dtype)


def test_selected_attention_empty_selection():
    from kvblend.kernels.triton_attention import selected_attention_triton

    q = randn(6, 0, 64)
    out = selected_attention_triton(q, randn(2, 10, 64), randn(2, 10, 64), torch.empty(0, dtype=torch.long, device=DEVICE), 0.125)
    assert out.shape == (6, 0, 64)


TRITON_ENTRY_POINTS = {
    "triton_rope": "rope_realign_triton",
    "triton_deviation": "kv_deviation_triton",
    "triton_scatter": "scatter_rows_triton",
    "triton_attention": "selected_attention_triton",
}


def count_triton_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Wrap the executor's Triton entry points (looked up at call time by the dispatchers) in counters."""
    calls: Counter = Counter()
    for module_name, fn_name in TRITON_ENTRY_POINTS.items():
        module = importlib.import_module(f"kvblend.kernels.{module_name}")

        def counted(*args, _fn=getattr(module, fn_name), _name=fn_name):
            calls[_name] += 1
            return _fn(*args)

        monkeypatch.setattr(module, fn_name, counted)
    return calls


@pytest.mark.parametrize("blend", [
    dict(),  # defaults: the look-ahead's ranking at layer 0 (no deviation to measure)
    dict(selection="deviation", recompute_ratio=0.15),  # CacheBlend: V deviation at layer 1
    dict(deviation="kv", selection="query", check_layers=[1, 2], check_ratios=[0.5, 0.15], recompute_ratio=0.15),
], ids=["defaults", "cacheblend", "kv-query-gradual"])
def test_blend_executor_same_tokens_with_triton(tmp_path, monkeypatch, blend):
    """Same first-token logits (fp32, 1e-4) and greedy tokens from the tiny model's blend either way."""
    from tiny import make_tiny_model

    from kvblend import KVBlend
    from kvblend.config import BlendConfig

    folder = make_tiny_model(tmp_path / "llama", "llama")
    chunks = ["The violin was made in Cremona by a famous luthier. ", "Its owner sold it in Paris in 1921. ", "Nobody knows where it is today."]
    question = "Where was the violin made?"
    calls = count_triton_calls(monkeypatch)
    runs = {}
    for backend in ("torch", "triton"):
        kb = KVBlend(model=str(folder), device=DEVICE, config=BlendConfig(backend=backend, **blend))
        kb.precompute(chunks)
        pre = kb.prefill(chunks, question)
        assert pre.stats.chunk_hits == 3 and 0 < pre.stats.tokens_recomputed < pre.stats.tokens_cached
        runs[backend] = pre.logits, kb.generate(chunks, question, max_new_tokens=8).token_ids
        if backend == "torch":
            assert not calls
    deviates = BlendConfig(**blend).deviation_kind != "none"
    assert set(calls) == {fn for fn in TRITON_ENTRY_POINTS.values() if deviates or fn != "kv_deviation_triton"}
    torch.testing.assert_close(runs["triton"][0], runs["torch"][0], atol=1e-4, rtol=1e-4)
    assert runs["triton"][1] == runs["torch"][1]


def test_bench_kernels_smoke():
    from kvblend.kernels.bench import bench_kernels

    rows = bench_kernels("cpu", tokens=(96,), heads=4, kv_heads=2, head_dim=64, repeats=1)
    assert {(r["kernel"], r["backend"]) for r in rows} >= {("selected_attention", "triton"), ("rope_realign", "torch"),
                                                           ("selected_attention", "auto")}
    assert all(r["value"] > 0 for r in rows)


@pytest.mark.parametrize("op", ["rms_norm", "silu_mul"])
def test_backend_triton_is_refused_by_name_where_an_op_has_no_triton_kernel(op):
    from kvblend.kernels.dispatch import choose

    with pytest.raises(ValueError, match=f"backend 'triton': {op} has no Triton kernel"):
        choose(op, "triton", randn(2, 8))


def test_the_dispatcher_chooses_each_ops_implementation():
    """auto: Triton on CUDA, C++ on CPU fp32 where the op has one, torch otherwise; triton wherever asked."""
    from kvblend.kernels import cpu_library
    from kvblend.kernels.dispatch import KERNELS, choose

    x = randn(2, 8)
    for op, kernels in KERNELS.items():
        assert choose(op, "torch", x) == "torch"
        auto = "triton" if DEVICE == "cuda" and "triton" in kernels else "cpp" if "cpp" in kernels and cpu_library.available() and DEVICE == "cpu" else "torch"
        assert choose(op, "auto", x) == auto
        if "triton" in kernels:
            assert choose(op, "triton", x) == "triton"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        choose("kv_deviation", "cuda", x)
