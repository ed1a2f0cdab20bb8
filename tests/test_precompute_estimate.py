"""`kvblend precompute --dry-run`: the store size in every codec and the time at a measured speed."""
import re

from rich.filesize import decimal
from typer.testing import CliRunner

from kvblend.cli import app
from kvblend.corpus.estimate import Estimate, format_estimate, sample
from kvblend.corpus.precompute import PlannedChunk
from kvblend.corpus.splitter import Chunk

runner = CliRunner()


def test_dry_run_prints_every_codecs_size_and_a_measured_time(tiny_models, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(" ".join(f"Fact {i}.{j}: the lamp {j} burns for {j * 3} hours." for j in range(12)))
    store = tmp_path / "store"
    res = runner.invoke(app, ["precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"]),
                              "--chunk-tokens", "64", "--dry-run", "--codec", "int4"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    tokens = int(re.search(r"([\d,]+) tokens;", out).group(1).replace(",", ""))
    # tiny llama: 4 layers · 2 kv heads · head_dim 16, float32 → raw 1,024 B/token; int4 152: per layer and head,
    # keys 8 bytes of nibbles + 16 channels' float16 scales over 32 tokens (1 byte), values 8 + one 16-value row's scale (2)
    assert f"raw {decimal(tokens * 1024)}," in out and f"int4 {decimal(tokens * 152)} (chosen)" in out
    assert re.search(r"estimated time \d+ s at [\d,]+ tok/s per worker \(measured here\)", out)
    assert not store.exists()


def test_dry_run_times_the_encoding_the_real_run_will_use(tiny_models, tmp_path, monkeypatch):
    from kvblend.cli import estimate as cli_estimate

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(" ".join(f"Fact {j}: the lamp {j} burns for {j * 3} hours." for j in range(40)))
    used = []

    def measured(encode, chunks):
        used.append(encode.__self__.config.blend)
        return 100.0

    monkeypatch.setattr(cli_estimate, "measure_tokens_per_s", measured)
    res = runner.invoke(app, ["precompute", str(docs), "--store", str(tmp_path / "store"), "--model", str(tiny_models["llama"]),
                              "--chunk-tokens", "32", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert used[0].chunk_context == "primed" and "the lamp" in used[0].primer  # the corpus's primer, not the neutral one


def test_estimate_divides_the_time_among_workers():
    est = Estimate(10_000, {"raw": 1, "int4": 2}, tokens_per_s=500.0, workers=4)
    assert est.seconds == 5.0
    lines = format_estimate(est, "raw", lambda n: f"{n} B")
    assert lines[0] == "store size per codec: raw 1 B (chosen), int4 2 B"
    assert "× 4 workers" in lines[1]


def test_sample_keeps_a_warm_up_and_a_timed_chunk():
    planned = [PlannedChunk(Chunk("doc", 0, 2, f"t{i}"), 1500) for i in range(5)]
    assert len(sample(planned)) == 2 and len(sample(planned[:1])) == 1
