"""What the CLI and the server say about bad input, and what stats count: one clear sentence, the truth.

Unknown models and store specs, store maintenance on things that are not stores, empty questions,
file modes on a shared store, and hit counts that follow what the blend actually reused.
"""
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvblend.cli import app
from kvblend.store import DiskStore
from servers import free_port
from test_faults import text, write_docs

runner = CliRunner()


@pytest.fixture()
def chunks_file(tmp_path):
    path = tmp_path / "chunks.json"
    path.write_text('{"0": "The cat is called Biscuit.", "chunk_num": 1, "query": "What is the cat called?"}')
    return path


def test_unknown_model_alias_names_the_known_ones_and_fetches_nothing(tmp_path, chunks_file):
    docs = write_docs(tmp_path / "docs", 1)
    for args in (["precompute", str(docs), "--store", str(tmp_path / "s")], ["precompute", str(docs), "--store", str(tmp_path / "s"), "--dry-run"],
                 ["generate", "--chunks-file", str(chunks_file)]):
        res = runner.invoke(app, [*args, "--model", "smollm2-1.7b"])
        out = text(res.output)
        assert res.exit_code == 2 and "unknown model 'smollm2-1.7b'" in out and "smollm2-135m" in out, res.output
        assert "fetches nothing from a model hub" in out
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
    for extra, most in (([], None), (["--dry-run"], None), (["--chunk-context", "bos"], 4095)):
        res = runner.invoke(app, ["precompute", str(doc), "--store", str(tmp_path / "s"), "--model", str(tiny_models["llama"]),
                                  "--chunk-tokens", "5000", *extra])
        out = text(res.output)
        assert res.exit_code == 2, res.output
        assert "--chunk-tokens 5000 is more than" in out and "4096 positions" in out and "encoded after" in out
        assert f"use at most {most}" in out if most else "use at most" in out
        assert "Traceback" not in res.output and "encoding KV" not in out
    assert not (tmp_path / "s").exists()


def flip_a_byte(path: Path) -> None:
    """Damage the last layer's data: found only when the layer is read and checked."""
    with open(path, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))


def test_hits_count_what_the_blend_reused(tiny_models, tmp_path):
    """A chunk whose stored layer fails its checksum is recomputed: a miss in the stats and in ask's table."""
    from kvblend import KVBlend

    store = tmp_path / "store"
    docs = write_docs(tmp_path / "docs", 3, lines=2)
    model = str(tiny_models["llama"])
    assert runner.invoke(app, ["precompute", str(docs), "--store", str(store), "--model", model]).exit_code == 0
    disk = DiskStore(store)
    keys = sorted(e.key for e in disk.entries())
    flip_a_byte(disk.path(keys[0]))
    res = runner.invoke(app, ["ask", "Which tower keeps bells?", "--store", str(store), "--model", model, "--top-k", "3",
                              "--max-new-tokens", "1"])
    assert res.exit_code == 0 and "(2 hits, 1 misses)" in text(res.output), res.output
    table = [line for line in res.output.splitlines() if line.strip().startswith(("│ 1", "│ 2", "│ 3"))]
    assert sum(" miss " in line for line in table) == 1 and sum(" hit " in line for line in table) == 2, res.output
    flip_a_byte(disk.path(keys[0]))  # healed by the recompute: damage it again
    with KVBlend(model=model, store=str(store)) as kb:
        from kvblend.corpus import CorpusFolder

        records = sorted(CorpusFolder.for_store(str(store)).manifest().records.values(), key=lambda r: r.key)
        result = kb.generate([r.text for r in records], "Which tower keeps bells?", max_new_tokens=1)
    assert (result.stats.chunk_hits, result.stats.chunk_misses) == (2, 1)
    assert result.stats.reused == [r.key != keys[0] for r in records]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_hits_count_nothing_reused_when_redis_dies_mid_request(tiny_models, tmp_path, monkeypatch):
    """Redis answers the lookups, then dies before the layers are read: every chunk is recomputed, and counted a miss."""
    import kvblend.blend.lookup
    from kvblend import KVBlend
    from kvblend.config import KVBlendConfig, StoreConfig
    from test_faults import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        chunks = [f"Passage {i}: the tower at the harbour keeps {i} bells and rings them at dawn." for i in range(3)]
        config = StoreConfig(remote_url=server.url, prefetch_layers=0)  # layers are read by the blend itself
        settings = KVBlendConfig(model=str(tiny_models["llama"]), store=config)
        with KVBlend(config=settings) as kb:
            kb.precompute(chunks)
        start_prefetch = kvblend.blend.lookup.start_prefetch
        monkeypatch.setattr(kvblend.blend.lookup, "start_prefetch", lambda *a: (server.kill(), start_prefetch(*a))[1])
        with KVBlend(config=settings) as kb:
            result = kb.generate(chunks, "How many bells?", max_new_tokens=1)
        assert (result.stats.chunk_hits, result.stats.chunk_misses, result.stats.reused) == (0, 3, [False] * 3)
    finally:
        if server.proc.poll() is None:
            server.kill()
