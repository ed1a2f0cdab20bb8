"""Executor behaviour: exact masking, non-prefix reuse, selection policies, bad input."""
import math

import pytest
import torch

from tiny import dense_attention

from kvblend import BlendConfig, KVBlend
from kvblend.kernels import plan_attention, selected_attention
from kvblend.models import UnsupportedModelError
from kvblend.store import open_store

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


class Planted:
    """CHUNKS' stored KV with chosen cached tokens pushed far off at chosen layers, so which tokens a
    check layer must keep is known: the planted ones, by the deviation the selection reads."""

    def __init__(self, kb):
        self.kb = kb
        self.prompt = kb.build_prompt(CHUNKS, QUESTION)
        self.chunks = [(start, kb.store.get(kb.key_for(seg.ids)))
                       for seg, start in zip(self.prompt.segments, self.prompt.starts()) if seg.chunk is not None]
        self.cached = [p for start, kv in self.chunks for p in range(start, start + kv.num_tokens)]
        self.keys = [kv.keys.clone() for _, kv in self.chunks]
        self.values = [kv.values.clone() for _, kv in self.chunks]

    def budget(self, ratio: float) -> int:
        return math.ceil(ratio * len(self.cached) - 1e-9)

    def plant(self, layer: int, which: str, positions, size: float = 50.0) -> None:
        for (start, kv), keys, values in zip(self.chunks, self.keys, self.values):
            rows = [p - start for p in positions if start <= p < start + kv.num_tokens]
            (keys if which == "k" else values)[layer][:, rows] += size

    def selected(self, **config) -> set[int]:
        """The cached positions recomputed; CacheBlend's deviation ranking unless `config` says otherwise."""
        out = self.kb.executor.run(torch.tensor(self.prompt.ids), _spans(self), question_start=self.prompt.starts()[-1],
                                   config=BlendConfig(**{"selection": "deviation", **config}))
        return set(out.selected.tolist())


@pytest.mark.parametrize("deviation", ["v", "k", "kv"])
def test_deviation_selection_keeps_the_planted_tokens(kb, deviation):
    """V planted on one set, K on another: "v" keeps the first, "k" the second, "kv" both halves."""
    t = Planted(kb)
    b = t.budget(0.05)
    v_set, k_set = set(t.cached[3::17][:b]), set(t.cached[11::17][:b])
    assert not v_set & k_set and len(v_set) == len(k_set) == b
    if deviation == "kv":  # half of each: both signals count, each against its own mean
        v_set, k_set = set(sorted(v_set)[: b // 2]), set(sorted(k_set)[: b - b // 2])
    t.plant(1, "v", v_set)
    t.plant(1, "k", k_set)
    expected = {"v": v_set, "k": k_set, "kv": v_set | k_set}[deviation]
    assert t.selected(recompute_ratio=0.05, deviation=deviation) == expected


def test_sink_tokens_are_kept_first_within_the_budget(kb):
    t = Planted(kb)
    b = t.budget(0.05)
    sinks = {start + i for start, _ in t.chunks for i in range(2)}
    planted = set([p for p in t.cached[5::13] if p not in sinks][: b - len(sinks)])
    t.plant(1, "v", planted)
    assert t.selected(recompute_ratio=0.05, sink_tokens=2) == sinks | planted
    plain = t.selected(recompute_ratio=0.05)
    assert planted < plain and not sinks <= plain


def test_per_chunk_budget_gives_every_chunk_its_own_share(kb):
    """Deviation planted on the first chunk only: the global budget spends everything there, a
    per-chunk budget keeps ceil(r·size) of each chunk, the first chunk's from the planted ones."""
    t = Planted(kb)
    (start0, kv0), r = t.chunks[0], 0.1
    planted = set(range(start0, start0 + kv0.num_tokens, 2))
    t.plant(1, "v", planted)
    assert t.selected(recompute_ratio=r) <= planted
    per_chunk = t.selected(recompute_ratio=r, per_chunk_budget=True)
    for start, kv in t.chunks:
        mine = {p for p in per_chunk if start <= p < start + kv.num_tokens}
        assert len(mine) == math.ceil(r * kv.num_tokens - 1e-9)
    assert {p for p in per_chunk if p < start0 + kv0.num_tokens} <= planted


def test_query_selection_prefers_the_tokens_the_question_attends(kb):
    """Equal deviation planted on the b cached tokens the question attends most at layer 1 and on
    the b it attends least (by transformers' own attention weights): the query-aware ranking keeps
    the first b, the plain deviation ranking cannot tell them apart."""
    t = Planted(kb)
    b = t.budget(0.05)
    ids = torch.tensor([t.prompt.ids])
    kb.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            probs = kb.model(input_ids=ids, output_attentions=True).attentions[1][0]  # [heads, N, N]
    finally:
        kb.model.set_attn_implementation("sdpa")
    attention = probs[:, t.prompt.starts()[-1]:].mean(dim=(0, 1))
    ranked = sorted(t.cached, key=lambda p: float(attention[p]))
    most, least = set(ranked[-b:]), set(ranked[:b])
    t.plant(1, "v", most | least)
    assert t.selected(recompute_ratio=0.05, selection="query", query_weight=1.0) == most
    assert t.selected(recompute_ratio=0.05) != most


def _spans(t: Planted):
    from kvblend.blend.executor import CachedSpan
    from kvblend.store import ChunkKV

    return [CachedSpan(start, ChunkKV(kv.key, kv.fingerprint, k, v)) for (start, kv), k, v in zip(t.chunks, t.keys, t.values)]


def test_look_ahead_is_the_question_attention_over_reused_kv(kb):
    """The look-ahead's score of each position is the attention the question's tokens pay it,
    summed over layers, when they run over the reused KV: checked against transformers' own
    attention weights for the question run on reuse's cache."""
    from kvblend.blend.executor import REUSE
    from kvblend.engines.hf import to_dynamic_cache

    t = Planted(kb)
    ids, qs = torch.tensor(t.prompt.ids), t.prompt.starts()[-1]
    reuse = kb.executor.run(ids, _spans(t), question_start=qs, config=REUSE)
    state = kb.executor._start(ids, _spans(t), qs, BlendConfig(), profile=False)
    cache = to_dynamic_cache(kb.model.config, [k[:, :qs] for k in reuse.keys], [v[:, :qs] for v in reuse.values])
    kb.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = kb.model(input_ids=ids[None, qs:], past_key_values=cache, position_ids=torch.arange(qs, ids.numel())[None],
                           output_attentions=True)
    finally:
        kb.model.set_attn_implementation("sdpa")
    expected = sum(a[0].mean(dim=(0, 1)) for a in out.attentions)
    torch.testing.assert_close(state.question_mass, expected, atol=1e-5, rtol=1e-4)


def test_look_ahead_alone_recomputes_what_the_question_reads_most(kb):
    """The default ranking: the b cached tokens with the most look-ahead attention, chosen at
    layer 0, whatever the deviation planted elsewhere."""
    t = Planted(kb)
    b = t.budget(0.05)
    t.plant(1, "v", set(t.cached[1::7][:b]))
    ids, qs = torch.tensor(t.prompt.ids), t.prompt.starts()[-1]
    mass = kb.executor._start(ids, _spans(t), qs, BlendConfig(), profile=False).question_mass
    most = set(sorted(t.cached, key=lambda p: float(mass[p]))[-b:])
    assert BlendConfig().layers == [0] and BlendConfig().deviation_kind == "none"
    assert t.selected(recompute_ratio=0.05, selection="lookahead") == most
    assert t.selected(recompute_ratio=0.05) != most


def test_no_look_ahead_when_nothing_is_cached(kb):
    """A prompt whose chunks all miss has nothing to rank: no extra pass over its fresh tokens."""
    prompt = kb.build_prompt(CHUNKS, QUESTION)
    state = kb.executor._start(torch.tensor(prompt.ids), [], prompt.starts()[-1], BlendConfig(), profile=False)
    assert state.question_mass is None and state.n_cached == 0


def test_look_ahead_weighs_the_deviation_by_what_the_question_reads(kb):
    """Equal deviation planted on 2b cached tokens: weighted by the look-ahead, the blend keeps the
    b of them the question attends most; plain deviation cannot tell them apart, and with no
    weight the look-ahead changes nothing."""
    t = Planted(kb)
    b = t.budget(0.05)
    planted = t.cached[1::7][: 2 * b]
    t.plant(1, "v", set(planted))
    ids, qs = torch.tensor(t.prompt.ids), t.prompt.starts()[-1]
    mass = kb.executor._start(ids, _spans(t), qs, BlendConfig(), profile=False).question_mass
    most = set(sorted(planted, key=lambda p: float(mass[p]))[-b:])
    weighted = dict(recompute_ratio=0.05, selection="lookahead", deviation="v")
    assert t.selected(**weighted, query_weight=1.0) == most
    plain = t.selected(recompute_ratio=0.05)
    assert plain != most
    assert t.selected(**weighted, query_weight=0.0) == plain


def test_cached_temperature_divides_the_reused_keys_only(kb):
    """Rows read from the store have their keys divided by the temperature; recomputing every
    token (r = 1) still reproduces full prefill."""
    from kvblend.blend.executor import REUSE

    t = Planted(kb)
    ids, qs = torch.tensor(t.prompt.ids), t.prompt.starts()[-1]
    plain = kb.executor.run(ids, _spans(t), question_start=qs, config=REUSE)
    warm = kb.executor.run(ids, _spans(t), question_start=qs,
                           config=BlendConfig(recompute_ratio=0.0, check_layers=[], cached_temperature=2.0))
    cached = torch.tensor(t.cached)
    for a, b in zip(plain.keys, warm.keys):
        torch.testing.assert_close(b[:, cached], a[:, cached] / 2.0)
    assert not torch.allclose(plain.logits, warm.logits, atol=1e-3)
    exact = kb.executor.run(ids, _spans(t), question_start=qs, config=BlendConfig(recompute_ratio=1.0, cached_temperature=2.0))
    full = kb.prefill(CHUNKS, QUESTION, "full")
    torch.testing.assert_close(exact.logits, full.logits, atol=1e-4, rtol=0)


def test_gradual_filtering_only_narrows_the_earlier_choice(kb):
    """Layer 1 keeps the planted A (r = 0.1); layer 2 keeps B within A (r = 0.05), never C, which
    deviates more at layer 2 but was dropped at layer 1."""
    t = Planted(kb)
    a = set(t.cached[2::9][: t.budget(0.1)])
    b = set(sorted(a)[::2][: t.budget(0.05)])
    assert len(b) == t.budget(0.05)
    c = set([p for p in t.cached[4::9] if p not in a][: t.budget(0.05)])
    t.plant(1, "v", a)
    t.plant(2, "v", b)
    t.plant(2, "v", c, size=200.0)
    assert t.selected(recompute_ratio=0.05, check_layers=[1, 2], check_ratios=[0.1, 0.05]) == b
    assert t.selected(recompute_ratio=0.05, check_layers=[2]) == c  # one check at layer 2 alone takes C


def test_random_selection_ignores_deviation_and_follows_its_seed(kb):
    t = Planted(kb)
    b = t.budget(0.05)
    planted = set(t.cached[3::17][:b])
    t.plant(1, "v", planted)
    first = t.selected(recompute_ratio=0.05, selection="random")
    assert len(first) == b and first != planted
    assert t.selected(recompute_ratio=0.05, selection="random") == first
    assert t.selected(recompute_ratio=0.05, selection="random", seed=1) != first


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
        BlendConfig(chunk_context="bos", primer="a passage")
    from kvblend.eval.methods import parse_methods

    with pytest.raises(ValueError, match="chunk encoding is set once per run"):
        parse_methods("full,blend[chunk_context=head]", BlendConfig())
    with pytest.raises(ValueError, match='deviation="none" ranks by the question'):
        BlendConfig(selection="deviation", deviation="none")
    cacheblend = parse_methods("full,blend[selection=deviation]", BlendConfig())[1].config  # unset fields follow the selection
    assert (cacheblend.deviation_kind, cacheblend.layers, cacheblend.checks()) == ("v", [1], {1: 0.08})


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
    store = open_store(str(tmp_path / "store"))
    a = KVBlend(model=str(tiny_models["llama"]), store=store)
    a.precompute(CHUNKS)
    for other in (KVBlend(model=str(tiny_models["mistral"]), store=open_store(str(tmp_path / "store"))),
                  KVBlend(model=str(tiny_models["llama"]), dtype="bfloat16", store=open_store(str(tmp_path / "store")))):
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
