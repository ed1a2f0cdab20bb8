"""Corpus tooling on tiny models: reading bad inputs, chunking, the manifest, and the precompute / ask CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvblend.cli import app
from kvblend.corpus import ChunkRecord, ChunkSplitter, Document, Manifest, read_corpus
from kvblend.store import open_store
from tiny import byte_tokenizer

runner = CliRunner()
SENTENCES = [f"Fact {i}: the {c} lighthouse keeps {i * 7 % 13} lamps lit every night." for i, c in
             enumerate(["red", "blue", "green", "white", "grey", "black", "amber", "violet"] * 3)]


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "docs"
    (root / "notes").mkdir(parents=True)
    (root / "a.txt").write_text(" ".join(SENTENCES[:8]))
    (root / "notes" / "b.md").write_text("# Notes\n\n" + " ".join(SENTENCES[8:16]))
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": s, "id": i}) for i, s in enumerate(SENTENCES[16:])) + "\n")
    return root


def text(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def manifest_lines(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "corpus" / "manifest.jsonl").read_text().splitlines()]


def precompute(corpus_path, store, model, *extra):
    return runner.invoke(app, ["precompute", str(corpus_path), "--store", str(store), "--model", str(model),
                               "--chunk-tokens", "96", *extra])


def test_reader_reports_each_bad_input_and_keeps_the_good_ones(tmp_path, monkeypatch):
    (tmp_path / "good.txt").write_text("A fine sentence.")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (tmp_path / "empty.md").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "locked.txt").write_text("secret")
    (tmp_path / "rows.jsonl").write_text('{"text": "kept"}\n{"body": "no text field"}\nnot json\n')
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if p.name == "locked.txt" else real_read(p))
    result = read_corpus([tmp_path, tmp_path / "image.png", tmp_path / "missing.txt"])
    assert sorted(d.text for d in result.documents) == ["A fine sentence.", "kept"]
    reasons = {Path(p.source).name: p.reason for p in result.problems}
    assert "binary" in reasons["binary.txt"]
    assert "empty" in reasons["empty.md"]
    assert "not valid utf-8" in reasons["latin1.txt"] and "--encoding" in reasons["latin1.txt"]
    assert "Permission denied" in reasons["locked.txt"]
    assert "unsupported file type '.png'" in reasons["image.png"]
    assert "no such file" in reasons["missing.txt"]
    rows = [p.reason for p in result.problems if p.source.endswith("rows.jsonl")]
    assert any("no string field 'text'" in r and "--text-field" in r for r in rows) and any("not JSON" in r for r in rows)
    assert [d.text for d in read_corpus([tmp_path / "latin1.txt"], encoding="latin-1").documents] == ["café crème"]


def test_chunks_fit_the_token_budget_and_end_on_sentences():
    tok = byte_tokenizer()
    text = " ".join(SENTENCES)
    chunks = ChunkSplitter(tok, 120).split(Document("doc", text))
    assert len(chunks) > 3
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert len(tok(c.text, add_special_tokens=False)["input_ids"]) <= 120
        assert c.text.endswith(".")
    with pytest.raises(ValueError, match="chunk_tokens"):
        ChunkSplitter(tok, 0)


def test_manifest_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    records = [ChunkRecord(f"doc@{i}-{i + 1}", "doc", i, i + 1, f"key{i}", 1, "x") for i in range(3)]
    with Manifest(path) as m:
        for r in records[:2]:
            m.append(r)
    with path.open("a") as f:
        f.write('{"id": "doc@9-10", "sou')  # what a kill -9 mid-write leaves
    with Manifest(path) as m:
        assert list(m.records.values()) == records[:2]
        m.append(records[2])
    assert list(Manifest(path).records.values()) == records


def test_precompute_stores_indexes_resumes_and_answers(tiny_models, corpus, tmp_path):
    store = tmp_path / "store"
    res = precompute(corpus, store, tiny_models["llama"])
    assert res.exit_code == 0, res.output
    lines = manifest_lines(store)
    assert f"→ {len(lines)} chunks" in text(res) and f"encoded {len(lines)} chunks" in text(res)
    assert {Path(r["source"].split(":")[0]).name for r in lines} == {"a.txt", "b.md", "c.jsonl"}
    kv = open_store(str(store))
    assert all(kv.contains(r["key"]) for r in lines)
    assert all(r["tokens"] <= 96 for r in lines)

    again = precompute(corpus, store, tiny_models["llama"])
    assert again.exit_code == 0, again.output
    assert "encoded 0 chunks" in text(again) and f"skipped {len(lines)} already stored" in text(again)
    assert manifest_lines(store) == lines

    ask = runner.invoke(app, ["ask", "How many lamps does the violet lighthouse keep?", "--store", str(store),
                              "--model", str(tiny_models["llama"]), "--top-k", "3", "--max-new-tokens", "4"])
    assert ask.exit_code == 0, ask.output
    assert "sources" in text(ask) and "(3 hits, 0 misses)" in text(ask)


def test_dry_run_prints_the_store_size_and_encodes_nothing(tiny_models, corpus, tmp_path):
    store = tmp_path / "store"
    res = precompute(corpus, store, tiny_models["llama"], "--dry-run", "--codec", "raw")
    assert res.exit_code == 0, res.output
    assert "1,024 B/token (float32, raw)" in text(res)  # 2 · 4 layers · 2 kv heads · 16 head dims · 4 bytes
    res = precompute(corpus, store, tiny_models["llama"], "--dry-run", "--codec", "int8")
    assert "320 B/token (float32, int8)" in text(res)  # 4 layers · 2 · 2 kv heads · (16 one-byte codes + a 4-byte scale)
    assert not store.exists()


def test_bad_files_and_another_model_lose_nothing_stored(tiny_models, corpus, tmp_path):
    store = tmp_path / "store"
    assert precompute(corpus, store, tiny_models["llama"]).exit_code == 0
    before = manifest_lines(store)
    (corpus / "binary.txt").write_bytes(b"\x00\xff" * 64)
    (corpus / "empty.txt").write_text("")
    (corpus / "latin1.md").write_bytes("naïve".encode("latin-1"))
    res = precompute(corpus, store, tiny_models["llama"])
    assert res.exit_code == 0, res.output
    assert "binary" in text(res) and "empty file" in text(res) and "not valid utf-8" in text(res)
    assert f"skipped {len(before)} already stored" in text(res) and manifest_lines(store) == before

    other = precompute(corpus, store, tiny_models["qwen2"])
    assert other.exit_code == 2 and "was built with model" in text(other)
    ask = runner.invoke(app, ["ask", "q?", "--store", str(store), "--model", str(tiny_models["qwen2"])])
    assert ask.exit_code == 2 and "was built with model" in text(ask)
    assert manifest_lines(store) == before
    kv = open_store(str(store))
    assert all(kv.contains(r["key"]) for r in before)

    nothing = precompute(corpus / "binary.txt", store, tiny_models["llama"])
    assert nothing.exit_code == 2 and "no readable text" in text(nothing)


def test_ask_without_an_index_says_how_to_build_one(tiny_models, corpus, tmp_path):
    store = tmp_path / "store"
    assert precompute(corpus, store, tiny_models["llama"], "--no-index").exit_code == 0
    res = runner.invoke(app, ["ask", "q?", "--store", str(store), "--model", str(tiny_models["llama"])])
    assert res.exit_code == 2 and "no chunk index" in text(res) and "kvblend precompute" in text(res)


def test_precompute_resumes_after_kill_9(tiny_models, tmp_path):
    docs = tmp_path / "big"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(" ".join(f"Doc {i} line {j}: {SENTENCES[(i + j) % len(SENTENCES)]}" for j in range(40)))
    store = tmp_path / "store"
    cmd = [sys.executable, "-c", "from kvblend.cli import app; app()", "precompute", str(docs), "--store", str(store), "--model",
           str(tiny_models["llama"]), "--chunk-tokens", "512", "--threads", "1", "--no-index"]
    manifest = store / "corpus" / "manifest.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "120"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    kept = len(Manifest(manifest).records)

    res = runner.invoke(app, ["precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"]),
                              "--chunk-tokens", "512", "--no-index"])
    assert res.exit_code == 0, res.output
    lines = manifest_lines(store)
    total = len(lines)
    assert kept < total
    skipped = int(text(res).split("skipped ")[-1].split()[0])
    assert skipped >= kept - 2  # at most the writes still queued when the kill came are encoded again
    kv = open_store(str(store))
    assert all(kv.contains(r["key"]) for r in lines)


def test_index_uses_given_vectors_and_embeds_only_the_rest():
    """Ray actors embed while they encode: the driver's index takes their vectors, embedding only the others."""
    import numpy as np

    from kvblend.corpus import ChunkIndex

    class CountingEmbedder:
        name, dim = "counting", 4

        def __init__(self):
            self.embedded: list[str] = []

        def embed(self, texts, batch_size=32):
            self.embedded += texts
            return np.stack([np.eye(4, dtype=np.float32)[len(t) % 4] for t in texts])

    records = [ChunkRecord(id=f"c{i}", source="s", start=0, end=1, key=f"k{i}", tokens=3, text="x" * i) for i in range(4)]
    emb = CountingEmbedder()
    given = {"k0": np.array([0, 0, 0, 1], dtype=np.float32), "k2": np.array([0, 1, 0, 0], dtype=np.float32)}
    built = ChunkIndex([], __import__("faiss").IndexFlatIP(4), "counting").cover(records, emb, vectors=given)
    assert sorted(emb.embedded) == ["x", "xxx"]  # only the chunks with no given vector
    assert {r.key for r in built.records} == {"k0", "k1", "k2", "k3"}
    row = [r.key for r in built.records].index("k0")
    assert built.faiss_index.reconstruct(row).tolist() == [0, 0, 0, 1]
