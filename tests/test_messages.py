"""What the CLI and the server say about bad input, and what stats count: one clear sentence, the truth.

Unknown models and store specs, store maintenance on things that are not stores, empty questions,
file modes on a shared store, and hit counts that follow what the blend actually reused.
"""
import os
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvblend.cli import app
from kvblend.store import DiskStore
from test_faults import free_port, text, write_docs

runner = CliRunner()


def test_unknown_model_alias_names_the_known_ones_and_fetches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("a model hub was asked"))
    docs = write_docs(tmp_path / "docs", 1)
    for args in (["precompute", str(docs), "--store", str(tmp_path / "s")], ["precompute", str(docs), "--store", str(tmp_path / "s"), "--dry-run"],
                 ["ask", "q?", "--store", str(tmp_path / "s")]):
        res = runner.invoke(app, [*args, "--model", "smollm2-1.7b"])
        out = text(res.output)
        if args[0] == "ask":  # no index yet: that is what ask says first
            continue
        assert res.exit_code == 2 and "unknown model 'smollm2-1.7b'" in out and "smollm2-135m" in out, res.output
    res = runner.invoke(app, ["precompute", str(docs), "--store", str(tmp_path / "s"), "--model", "/nonexistent", "--dry-run"])
    assert res.exit_code == 2 and "model folder /nonexistent does not exist" in text(res.output), res.output
    assert "Repo id" not in res.output


def test_store_specs_that_are_not_stores_get_one_sentence(tiny_models, tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("not a store")
    docs = write_docs(tmp_path / "docs", 1)
    model = str(tiny_models["llama"])
    for args in (["precompute", str(docs), "--store", str(afile), "--model", model],
                 ["ask", "q?", "--store", str(afile), "--model", model]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and f"{afile} is a file, not a store folder" in text(res.output), res.output
    res = runner.invoke(app, ["precompute", str(docs), "--store", "http://127.0.0.1:9/store", "--model", model])
    out = text(res.output)
    assert res.exit_code == 2 and "not a http:// address" in out and "pydantic" not in out, res.output
    yaml = tmp_path / "s.yaml"
    yaml.write_text("remote_url: http://127.0.0.1:9\n")
    res = runner.invoke(app, ["precompute", str(docs), "--store", str(yaml), "--corpus", str(tmp_path / "c"), "--model", model])
    out = text(res.output)
    assert res.exit_code == 2 and "must look like redis://host:port/db" in out and "pydantic" not in out, res.output


def test_store_commands_take_a_redis_url_or_point_to_remote(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: stats says so, and does not mangle the URL
    res = runner.invoke(app, ["store", "stats", url])
    assert res.exit_code == 0 and f"remote tier {url} did not answer" in text(res.output) and "redis:/1" not in res.output
    res = runner.invoke(app, ["store", "verify", url])
    assert res.exit_code == 2 and f"{url} is a URL, not a store directory" in text(res.output) and "--remote" in res.output
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    res = runner.invoke(app, ["store", "verify", str(afile)])
    assert res.exit_code == 2 and "is a file, not a store directory" in text(res.output)


def test_verify_reports_foreign_and_leftover_files_and_refuses_a_non_store(tmp_path):
    from test_store_format import make_kv

    docs = write_docs(tmp_path / "docs", 2)
    res = runner.invoke(app, ["store", "verify", str(docs)])
    assert res.exit_code == 2 and "is not a kvblend store" in text(res.output), res.output

    store = tmp_path / "store"
    disk = DiskStore(store)
    kv = make_kv(0)
    disk.put(kv.key, kv)
    (disk.path(kv.key).parent / "notes.txt").write_text("someone else's")
    stale = disk.path(kv.key).parent / ".abcdef.tmp"
    stale.write_bytes(b"half an object")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (disk.path(kv.key).parent / ".fresh.tmp").write_bytes(b"being written")
    res = runner.invoke(app, ["store", "verify", str(store)])
    out = text(res.output)
    assert res.exit_code == 1, res.output
    assert "foreign" in out and "notes.txt" in out and "leftover" in out and ".abcdef.tmp" in out and ".fresh.tmp" not in out
    assert "1 objects are being written" in out
    assert runner.invoke(app, ["store", "verify", str(store), "--delete"]).exit_code == 1
    assert not stale.exists() and (disk.path(kv.key).parent / "notes.txt").exists()  # foreign files are not ours to remove

    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["store", "verify", str(empty)])
    assert res.exit_code == 0 and "an empty store" in text(res.output)


def test_store_files_follow_the_umask(tiny_models, tmp_path):
    docs = write_docs(tmp_path / "docs", 2)
    store = tmp_path / "store"
    old = os.umask(0o022)
    try:
        res = runner.invoke(app, ["precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"])])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    files = [f for f in store.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"corpus.json", "manifest.jsonl", "index.faiss", "index.json"} <= names and any(n.endswith(".kvb") for n in names)
    modes = {str(f.relative_to(store)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_empty_question_is_refused(tiny_models, tmp_path):
    from kvblend.config import BlendConfig
    from kvblend.engines.vllm_serve import BadRequest, _blend_config, _question

    res = runner.invoke(app, ["ask", "  ", "--store", str(tmp_path), "--model", str(tiny_models["llama"])])
    assert res.exit_code == 2 and "the question is empty" in text(res.output)
    with pytest.raises(BadRequest, match="empty"):
        _question({"messages": [{"role": "user", "content": " "}]}, chat=True)
    with pytest.raises(BadRequest, match="empty"):
        _question({"prompt": ""}, chat=False)
    with pytest.raises(BadRequest) as err:
        _blend_config(BlendConfig(), {"recompute_ratio": "abc"})
    assert str(err.value) == 'kvblend.recompute_ratio must be a number from 0 to 1 or "auto", not \'abc\''


def test_chunk_tokens_over_the_context_are_refused_before_loading(tiny_models, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text("A sentence of some length about nothing in particular. " * 120)  # ~6,700 bytes: byte tokens
    for extra in ([], ["--dry-run"]):
        res = runner.invoke(app, ["precompute", str(doc), "--store", str(tmp_path / "s"), "--model", str(tiny_models["llama"]),
                                  "--chunk-tokens", "5000", *extra])
        out = text(res.output)
        assert res.exit_code == 2, res.output
        assert "--chunk-tokens 5000 is more than" in out and "4096 positions" in out and "use at most 4095" in out
        assert "Traceback" not in res.output and "encoding KV" not in out
    assert not (tmp_path / "s").exists()


def test_hits_count_what_the_blend_reused(tiny_models, tmp_path):
    """A chunk whose stored layer fails its checksum is recomputed: a miss in the stats and in ask's table."""
    from kvblend import KVBlend

    store = tmp_path / "store"
    docs = write_docs(tmp_path / "docs", 3, lines=2)
    model = str(tiny_models["llama"])
    assert runner.invoke(app, ["precompute", str(docs), "--store", str(store), "--model", model]).exit_code == 0
    disk = DiskStore(store)
    keys = sorted(e.key for e in disk.entries())
    with open(disk.path(keys[0]), "r+b") as f:  # one flipped byte in the last layer: found when it is read
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    with KVBlend(model=model, store=str(store)) as kb:
        from kvblend.corpus import CorpusFolder

        records = sorted(CorpusFolder.for_store(str(store)).manifest().records.values(), key=lambda r: r.key)
        result = kb.generate([r.text for r in records], "Which tower keeps bells?", max_new_tokens=1)
    assert (result.stats.chunk_hits, result.stats.chunk_misses) == (2, 1)
    assert result.stats.tokens_cached == sum(r.tokens for r in records[1:])
