"""Metrics, method specs and dataset loaders."""
import json
import math
from pathlib import Path

import pytest
import torch

from kvblend import BlendConfig
from kvblend.eval.datasets import BUNDLED, bundled_dir, load_chunks_file, load_dataset, resolve_dataset
from kvblend.eval.methods import parse_methods
from kvblend.eval.metrics import f1_score, kl_divergence, normalize_answer, token_agreement


def test_f1_uses_squad_normalisation_and_best_answer():
    assert normalize_answer("The  Exeter College!") == "exeter college"
    assert f1_score("Exeter College", ["Oxford", "exeter college"]) == 1.0
    assert f1_score("at Exeter", ["Exeter College"]) == pytest.approx(0.5)
    assert f1_score("Paris", ["London"]) == 0.0


def test_kl_is_zero_on_identity_and_positive_otherwise():
    a = torch.tensor([[2.0, 0.0, -1.0]])
    assert kl_divergence(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(a, a.flip(-1)).item() > 0.5


def test_token_agreement_is_positionwise():
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert token_agreement([1, 2], [1]) == 0.5


def test_method_specs_put_full_first_and_parse_overrides():
    specs = parse_methods("blend[check_layers=[1,2],check_ratios=[0.3,0.15]],reuse", BlendConfig(recompute_ratio=0.15))
    assert [s.method for s in specs] == ["full", "blend", "reuse"]
    assert specs[1].config.check_layers == [1, 2] and specs[1].config.check_ratios == [0.3, 0.15]
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("blend[oops]", BlendConfig())
    with pytest.raises(ValueError):
        parse_methods("blend[recompute_ratio=2]", BlendConfig())


def test_loaders_read_both_bundled_formats(datasets):
    one = load_dataset(datasets / "cacheblend" / "3.json")
    assert len(one) == 1 and len(one[0].chunks) >= 5 and one[0].question
    folder = load_dataset(datasets / "cacheblend", top_k=2)
    assert len(folder) == 10 and all(len(r.chunks) == 2 for r in folder)
    musique = load_dataset(datasets / "musique_dev.json", top_k=6, limit=4)
    assert len(musique) == 4 and all(len(r.chunks) == 6 and r.answers for r in musique)


def test_bundled_datasets_load_by_name_and_ship_their_licences():
    assert len(load_dataset("musique-dev")) == 75
    assert len(load_dataset("cacheblend")) == 10
    for i in range(1, 11):
        record = load_dataset(f"cacheblend-{i}")[0]
        assert record.chunks and record.question
        assert load_chunks_file(f"cacheblend-{i}").chunks == record.chunks
    assert all((bundled_dir() / rel).exists() for rel in BUNDLED.values())
    notice = (bundled_dir() / "NOTICE.md").read_text()
    assert "CC BY 4.0" in notice and "Apache" in notice and (bundled_dir() / "LICENSE-Apache-2.0.txt").exists()


def test_a_path_wins_over_a_bundled_name_and_unknown_names_list_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cacheblend-1").write_text(json.dumps(["only chunk"]))
    assert resolve_dataset("cacheblend-1") == Path("cacheblend-1")
    with pytest.raises(ValueError, match="musique-dev"):
        resolve_dataset("musique-test")


def test_loaders_name_the_bad_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"0": "a", "query": "q"}))
    with pytest.raises(ValueError, match="x.json: not a CacheBlend prompt file"):
        load_chunks_file(bad)
    bad.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="neither"):
        load_dataset(bad)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_records():
    from kvblend.eval.metrics import bootstrap_interval

    few = [0.0, 1.0] * 5
    many = few * 20
    lo, hi = bootstrap_interval(few)
    assert lo < 0.5 < hi
    lo2, hi2 = bootstrap_interval(many)
    assert lo < lo2 < 0.5 < hi2 < hi
    assert bootstrap_interval([0.3] * 7) == pytest.approx((0.3, 0.3))


def test_oracles_see_no_distance_where_the_cache_is_exact(tiny_models):
    """With chunk_context="head" the first chunk's cached KV is exactly full prefill's: both oracles
    score its tokens 0 and the later chunk's above 0; the blend then recomputes exactly the ranking's top."""
    from kvblend import KVBlend
    from kvblend.eval.oracle import kv_distance, output_effect

    kb = KVBlend(model=str(tiny_models["llama"]), config=BlendConfig(chunk_context="head"))
    chunks = ["Alice keeps the spare key under the blue flowerpot.", "The train to Lyon leaves at seven."]
    kb.precompute(chunks)
    prompt = kb.build_prompt(chunks, "Where is the key?")
    (first, _), (second, _) = [(s, st) for s, st in zip(prompt.segments, prompt.starts()) if s.chunk is not None]
    starts = [st for s, st in zip(prompt.segments, prompt.starts()) if s.chunk is not None]
    one = slice(starts[0], starts[0] + len(first.ids))
    two = slice(starts[1], starts[1] + len(second.ids))
    full, reuse = kb.prefill(chunks, "Where is the key?", "full"), kb.prefill(chunks, "Where is the key?", "reuse")
    n = full.ids.numel()
    kv = kv_distance(full.cache, reuse.cache, n)
    assert kv[one].abs().max() < 1e-6 * kv[two].max() and kv[two].min() > 0
    effect = output_effect(kb.model, full.ids, full.cache, reuse.cache, full.logits[None], [])
    assert effect[one].abs().max() < 1e-6 * effect[two].max() and effect[two].max() > 0

    ranking = torch.zeros(n)
    chosen = torch.arange(two.start, two.stop)[[0, 3, 5]]
    ranking[chosen] = 1.0
    cfg = BlendConfig(recompute_ratio=3 / (len(first.ids) + len(second.ids)), chunk_context="head")
    out = kb.prefill(chunks, "Where is the key?", "blend", cfg, ranking=ranking)
    assert out.stats.tokens_recomputed == 3
    blended = kb.executor.run(full.ids, [], config=cfg, ranking=ranking)  # nothing cached: nothing to rank
    assert blended.selected.numel() == 0


def test_oracle_methods_parse_and_need_the_transformers_engine():
    specs = parse_methods("full,oracle-out[recompute_ratio=0.3],oracle-kv", BlendConfig())
    assert [(s.method, s.oracle) for s in specs] == [("full", None), ("blend", "out"), ("blend", "kv")]
    assert specs[1].config.recompute_ratio == 0.3
    with pytest.raises(ValueError, match="oracle-kv"):
        parse_methods("full,oracle-xx", BlendConfig())


def test_load_percentiles_interpolate_between_ranks():
    from kvblend.eval.load import percentile

    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0.5) == 2.5 and percentile(xs, 0.0) == 1.0 and percentile(xs, 1.0) == 4.0
    assert abs(percentile(xs, 0.99) - 3.97) < 1e-9
    assert percentile([7.0], 0.99) == 7.0 and math.isnan(percentile([], 0.5))


def test_frontier_labels_a_ratio_sweep_per_ranking():
    """A blend overriding only its ratio (and at most its ranking) is a point of a sweep; anything
    else is a point of its own."""
    from kvblend.eval.frontier import _label

    specs = parse_methods("blend[recompute_ratio=0.1],blend[selection=deviation,recompute_ratio=0.15],"
                          "blend[recompute_ratio=0.08,cached_temperature=1.1],blend", BlendConfig())
    assert [_label(s) for s in specs[1:]] == ["r=0.1", "r=0.15", "blend[recompute_ratio=0.08,cached_temperature=1.1]", "blend"]
    assert [s.config.selection for s in specs[1:3]] == ["lookahead", "deviation"]
