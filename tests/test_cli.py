"""The command line on tiny models: generate, eval, bench, and clean errors."""
import json

import pytest
import typer.main
from typer.testing import CliRunner

from kvblend.cli import app
from kvblend.cli.common import store_config
from kvblend.store import DiskStore

runner = CliRunner()


def unwrapped(output: str) -> str:
    """CLI output as one line: rich wraps messages (and draws panels) at the terminal's width."""
    return " ".join(output.replace("│", " ").split())


CHUNKS = ["The lighthouse keeper's cat is called Biscuit.", "Biscuit sleeps on the third stair every afternoon."]


@pytest.fixture()
def chunks_file(tmp_path):
    f = tmp_path / "prompt.json"
    f.write_text(json.dumps({"0": CHUNKS[0], "1": CHUNKS[1], "chunk_num": 2, "query": "\nWhat is the cat called?"}))
    return f


def test_generate_streams_an_answer_and_writes_stats(tiny_models, chunks_file, tmp_path):
    out = tmp_path / "answer.json"
    res = runner.invoke(app, ["generate", "--chunks-file", str(chunks_file), "--model", str(tiny_models["qwen2"]),
                              "--max-new-tokens", "5", "--json", str(out), "--store", str(tmp_path / "store")])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert len(data["token_ids"]) == 5
    assert data["stats"]["chunk_hits"] == 2 and data["stats"]["tokens_recomputed"] > 0
    assert any((tmp_path / "store").rglob("*"))


def test_recompute_ratio_takes_a_share_or_auto(tiny_models, chunks_file, tmp_path):
    out = tmp_path / "answer.json"
    base = ["generate", "--chunks-file", str(chunks_file), "--model", str(tiny_models["llama"]), "--max-new-tokens", "2"]
    res = runner.invoke(app, [*base, "--recompute-ratio", "auto", "--json", str(out)])
    assert res.exit_code == 0, res.output
    ratio = json.loads(out.read_text())["stats"]["recompute_ratio"]
    assert 0.0 < ratio <= 1.0 and f"r {ratio:.2f}" in res.output  # the per-request choice, in the stats line
    for bad, why in (("1.5", "1.5 is outside [0, 1]"), ("most", "'most' is neither a number nor 'auto'")):
        res = runner.invoke(app, [*base, "-r", bad])
        assert res.exit_code == 2 and why in unwrapped(res.output)


def test_codec_option_sets_the_store_codec(tiny_models, chunks_file, tmp_path, slow_disk_writes):
    store = tmp_path / "store"
    res = runner.invoke(app, ["generate", "--chunks-file", str(chunks_file), "--model", str(tiny_models["llama"]),
                              "--max-new-tokens", "2", "--store", str(store), "--codec", "int8"])
    assert res.exit_code == 0, res.output
    disk = DiskStore(store)
    assert len(disk.entries()) == 2 and {disk.header(e).codec for e in disk.entries()} == {"int8"}
    bad = runner.invoke(app, ["generate", "--chunks-file", str(chunks_file), "--model", str(tiny_models["llama"]), "--codec", "zstd"])
    message = unwrapped(bad.output)
    assert bad.exit_code == 2 and "unknown codec 'zstd'; choose one of raw, fp8, int8, int4" in message
    spec = tmp_path / "store.yaml"
    spec.write_text(f"store:\n  disk_dir: {store}\n  codec: fp8\n")
    assert store_config(str(spec), None).codec == "fp8" and store_config(str(spec), "raw").codec == "raw"


def test_every_command_taking_a_store_takes_a_codec():
    def commands(group, path=()):
        for name, cmd in group.commands.items():
            yield from commands(cmd, (*path, name)) if hasattr(cmd, "commands") else [((*path, name), cmd)]

    options = {path: {opt for p in cmd.params for opt in p.opts} for path, cmd in commands(typer.main.get_command(app))}
    with_store = {path for path, opts in options.items() if "--store" in opts}
    assert {("generate",), ("eval",), ("serve",), ("demo",), ("precompute",), ("ask",)} <= with_store
    assert all("--codec" in options[path] for path in with_store)


def test_generate_rejects_a_bad_file(tiny_models, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = runner.invoke(app, ["generate", "--chunks-file", str(bad), "--model", str(tiny_models["llama"])])
    assert res.exit_code == 2 and "not a readable JSON file" in unwrapped(res.output)


def test_unknown_model_folder_is_a_clear_error(tmp_path, chunks_file):
    res = runner.invoke(app, ["generate", "--chunks-file", str(chunks_file), "--model", str(tmp_path)])
    assert res.exit_code == 2 and "has no config.json" in unwrapped(res.output)


def test_eval_writes_the_documented_json(tiny_models, tmp_path):
    data = [{"question": "What is the cat called?", "answers": ["Biscuit"],
             "ctxs": [{"title": "Cats", "text": c} for c in CHUNKS]} for _ in range(2)]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(data))
    out = tmp_path / "eval.json"
    primer = tmp_path / "primer.txt"
    primer.write_text("Dogs and cats share the house; the dog sleeps by the door.\n")
    res = runner.invoke(app, ["eval", str(ds), "--model", str(tiny_models["qwen3"]), "--limit", "2", "--top-k", "2",
                              "--max-new-tokens", "4", "--methods", "full,reuse,blend,blend[selection=query]", "--json", str(out),
                              "--chunk-context", "primed", "--primer-file", str(primer)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["config"]["kvblend"]["blend"]["chunk_context"] == "primed"
    assert report["config"]["kvblend"]["blend"]["primer"] == primer.read_text().strip()
    methods = report["methods"]
    assert list(methods) == ["full", "reuse", "blend", "blend[selection=query]"]
    keys = {"f1", "first_token_agree", "token_agree", "kl_first", "kl_tf", "ttft_median_s", "speedup_vs_full"}
    for m in methods.values():
        assert keys <= set(m)
    assert methods["full"]["kl_tf"] == 0 and methods["full"]["token_agree"] == 1
    assert methods["reuse"]["kl_tf"] > 0


def test_eval_json_holds_each_finished_record_while_the_run_goes_on(tiny_models, tmp_path, monkeypatch):
    from kvblend.eval import runner as eval_runner

    out, seen = tmp_path / "eval.json", []
    real = eval_runner.kl_divergence

    def watching(*args):  # called while a record is being scored: look at what the file holds so far
        seen.append(len(json.loads(out.read_text())["records"]["full"]) if out.exists() else 0)
        return real(*args)

    monkeypatch.setattr(eval_runner, "kl_divergence", watching)
    data = [{"question": "What is the cat called?", "answers": ["Biscuit"],
             "ctxs": [{"title": "Cats", "text": c} for c in CHUNKS]} for _ in range(3)]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(data))
    res = runner.invoke(app, ["eval", str(ds), "--model", str(tiny_models["qwen3"]), "--top-k", "2", "--max-new-tokens", "2",
                              "--methods", "full,reuse", "--json", str(out), "--chunk-context", "bos"])
    assert res.exit_code == 0, res.output
    assert seen == [0, 0, 1, 1, 2, 2]  # full and reuse scored per record; finished records are on disk
    final = json.loads(out.read_text())
    assert len(final["records"]["reuse"]) == 3 and final["methods"]["reuse"]["kl_tf"] > 0
    assert not list(tmp_path.glob("*.partial"))


def test_eval_rejects_an_unknown_method(tiny_models, datasets):
    res = runner.invoke(app, ["eval", str(datasets / "cacheblend" / "1.json"), "--model", str(tiny_models["llama"]),
                              "--methods", "full,magic"])
    assert res.exit_code != 0 and "unknown method 'magic'" in unwrapped(res.output)
    res = runner.invoke(app, ["eval", "cacheblend-1", "--model", str(tiny_models["llama"]), "--chunk-context", "eos"])
    assert res.exit_code == 2 and "chunk_context" in unwrapped(res.output)


def test_eval_takes_a_bundled_dataset_by_name(tiny_models, tmp_path):
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", "musique-dev", "--limit", "1", "--top-k", "1", "--methods", "full,blend",
                              "--max-new-tokens", "2", "--model", str(tiny_models["llama"]), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["config"]["dataset"] == "musique-dev"
    res = runner.invoke(app, ["eval", "musique-test", "--model", str(tiny_models["llama"])])
    assert res.exit_code == 2 and "not a bundled dataset" in unwrapped(res.output)


def test_bench_reports_every_method_and_plots(tiny_models, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = runner.invoke(app, ["bench", "--model", str(tiny_models["llama"]), "--context-tokens", "256", "--chunk-tokens", "128",
                              "--ratios", "0.1,0.5", "--repeats", "1", "--json", str(out), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("full", None), ("reuse", None), ("blend", 0.1), ("blend", 0.5)]
    assert png.stat().st_size > 1000


def test_models_pull_rejects_unknown_alias():
    res = runner.invoke(app, ["models", "pull", "gpt-17"])
    assert res.exit_code == 2 and "unknown alias" in unwrapped(res.output)


def test_eval_frontier_sweeps_ratios_and_plots(tiny_models, tmp_path):
    out, png = tmp_path / "eval.json", tmp_path / "frontier.png"
    res = runner.invoke(app, ["eval", "cacheblend-1", "--limit", "1", "--top-k", "1", "--max-new-tokens", "2",
                              "--model", str(tiny_models["llama"]), "--frontier", "--ratios", "0.5,0.1",
                              "--methods", "full,blend[selection=random]", "--plot", str(png), "--json", str(out)])
    assert res.exit_code == 0, res.output
    methods = json.loads(out.read_text())["methods"]
    assert list(methods) == ["full", "reuse", "blend[recompute_ratio=0.1]", "blend[recompute_ratio=0.5]", "blend[selection=random]"]
    lo, hi = methods["reuse"]["kl_tf_ci"]
    assert lo <= methods["reuse"]["kl_tf"] <= hi
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["eval", "cacheblend-1", "--model", str(tiny_models["llama"]), "--frontier", "--ratios", "0.1,2"])
    assert res.exit_code == 2 and "--ratios" in unwrapped(res.output)
    res = runner.invoke(app, ["eval", "cacheblend-1", "--model", str(tiny_models["llama"]), "--methods", "full"])
    assert res.exit_code == 2 and "exceeds the model's context" in unwrapped(res.output)  # a clear error, no traceback


@pytest.mark.parametrize(("args", "message"), [
    (["--store", "kv", "--kv-cache-bytes", "lots"], "--kv-cache-bytes: 'lots' is not a size"),
    ([], "kvblend serve needs --store"),
])
def test_serve_refuses_bad_settings_before_vllm_starts(tiny_models, args, message):
    res = runner.invoke(app, ["serve", "--model", str(tiny_models["llama"]), *args])
    assert res.exit_code == 2
    assert message in unwrapped(res.output)
