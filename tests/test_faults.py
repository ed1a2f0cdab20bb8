"""Precompute, index and store under faults: Redis down or killed mid-run, a full disk, kill -9,
concurrent runs, several runs into one store.

After every fault the store is checked as a user would: `kvblend store verify` is clean, the
manifest parses (no torn line), the index covers exactly the manifest's chunks, every recorded
chunk is in the store, and the exit code and message say what happened.
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvblend.cli import app
from kvblend.corpus import ChunkIndex, ChunkRecord
from kvblend.store import DiskStore
from servers import RedisServer, free_port

runner = CliRunner()
CLI = [sys.executable, "-c", "from kvblend.cli import app; app()"]
ENV = {**os.environ, "COLUMNS": "250"}  # one line per message: asserts read whole sentences
needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def text(output: str) -> str:
    return " ".join(output.split())


def write_docs(folder: Path, n: int, lines: int = 12, tag: str = "doc") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{tag}{i:02d}.txt").write_text(" ".join(
            f"{tag.title()} {i} note {j}: the {['red', 'blue', 'green'][j % 3]} tower at {tag} {i} keeps {i * j % 17} bells." for j in range(lines)))
    return folder


def manifest_records(corpus: Path) -> list[ChunkRecord]:
    """Every manifest line, parsed: the file must end with a whole line."""
    path = corpus / "manifest.jsonl"
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last line: {data[-80:]!r}"
    return [ChunkRecord(**json.loads(line)) for line in data.decode().splitlines()]


def assert_consistent(corpus: Path, store: Path | None = None, remote=None) -> list[ChunkRecord]:
    """verify clean, manifest parses, the saved index covers exactly its chunks, each one is stored."""
    records = manifest_records(corpus)
    keys = {r.key for r in records}
    if store is not None:
        res = runner.invoke(app, ["store", "verify", str(store)])
        assert res.exit_code == 0, res.output
        assert keys <= {e.key for e in DiskStore(store).entries()}
    if remote is not None:
        for key in keys:
            assert remote.get(key).materialize().num_tokens > 0
    index = ChunkIndex.load(corpus, {r.id: r for r in records})
    assert index.keys() == keys and not index.behind and index.faiss_index.ntotal == len(index.records)
    return records


def encoded(output: str) -> int:
    return int(text(output).split("encoded ")[1].split()[0])


# -- Redis ----------------------------------------------------------------------------------------------
def test_redis_down_at_start_stores_nothing_and_says_so(tiny_models, tmp_path):
    docs = write_docs(tmp_path / "docs", 3)
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    corpus = tmp_path / "corpus"
    res = runner.invoke(app, ["precompute", *map(str, sorted(docs.iterdir())), "--store", url, "--corpus", str(corpus),
                              "--model", str(tiny_models["llama"])])
    assert res.exit_code == 1, res.output
    out = text(res.output)
    planned = int(out.split(" documents → ")[1].split()[0])
    assert "encoded 0 chunks" in out and f"{planned} of {planned} chunks could not be stored" in out, res.output
    assert f"remote tier: {url}" in out and "Connection refused" in out
    assert manifest_records(corpus) == []
    assert_consistent(corpus)


@needs_redis_server
def test_redis_killed_mid_precompute_records_only_what_it_acknowledged(tiny_models, tmp_path):
    from kvblend.store.remote import RedisStore

    server = RedisServer(tmp_path, durable=True)
    server.start()
    docs = write_docs(tmp_path / "docs", 20, lines=40)
    corpus = tmp_path / "corpus"
    cmd = [*CLI, "precompute", str(docs), "--store", server.url, "--corpus", str(corpus), "--model", str(tiny_models["llama"]),
           "--chunk-tokens", "512", "--threads", "1", "--codec", "raw"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while len(manifest_records(corpus)) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before Redis could be killed"
        server.kill()
        output = proc.communicate(timeout=300)[0]
    finally:
        if server.proc.poll() is None:
            server.kill()
    out = text(output)
    assert proc.returncode == 1, output
    planned = int(out.split(" documents → ")[1].split()[0])
    records = manifest_records(corpus)
    assert 6 <= len(records) < planned and encoded(output) == len(records)
    assert f"{planned - len(records)} of {planned} chunks could not be stored" in out and "remote tier" in out
    server.start()  # the same data folder: what the server acknowledged is back
    try:
        assert_consistent(corpus, remote=RedisStore(server.url))
        again = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        assert again.returncode == 0, again.stdout + again.stderr
        skipped = int(text(again.stdout + again.stderr).split("skipped ")[1].split()[0])
        # a write the server took just before it died, whose answer never came back, is found stored: skipped
        assert encoded(again.stdout + again.stderr) + skipped == planned and skipped - len(records) <= 2
        assert len(assert_consistent(corpus, remote=RedisStore(server.url))) == planned
    finally:
        server.kill()


# -- a full disk ------------------------------------------------------------------------------------------
class SmallDisk:
    """A folder on a file system of `size` bytes: a tmpfs where this process may mount one, else a
    fault-injecting layer over the disk tier's writes and the manifest's appends with the same budget."""

    def __init__(self, folder: Path, size: int, monkeypatch):
        self.folder, self.size, self.mp = folder, size, monkeypatch
        folder.mkdir(parents=True)
        self.mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0
        if not self.mounted:
            self._inject()

    def used(self) -> int:
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())

    def _full(self, more: int) -> bool:
        return self.used() + more > self.size

    def _inject(self) -> None:
        from kvblend.corpus import manifest as manifest_module
        from kvblend.store.format import encode_object

        small = self
        put = DiskStore.put

        def put_within_budget(store, key, kv):
            if Path(store.root).is_relative_to(small.folder) and small._full(encode_object(kv, store.codec)[0].total_nbytes):
                raise OSError(errno.ENOSPC, f"cannot write to {store.root}: No space left on device")
            put(store, key, kv)

        class FullOs:
            def __getattr__(self, name):
                return getattr(os, name)

            def write(self, fd, data):  # a short write, as a file system with a few bytes left makes
                room = small.size - small.used()
                if room <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return os.write(fd, data[:room])

        self.mp.setattr(DiskStore, "put", put_within_budget)
        self.mp.setattr(manifest_module, "os", FullOs())

    def grow(self, size: int) -> None:
        self.size = size
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.folder)], check=True)

    def fill(self) -> None:
        """Take every byte left (a filler file)."""
        if not self.mounted:
            self.size = self.used()
            return
        with open(self.folder / "filler", "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


@pytest.fixture()
def small_disk(tmp_path, monkeypatch):
    disks = []

    def make(name: str, size: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / name, size, monkeypatch))
        return disks[-1]

    yield make
    for d in disks:
        d.close()


def test_full_disk_fails_loudly_records_what_landed_and_the_rerun_completes(tiny_models, tmp_path, small_disk):
    disk = small_disk("small", 3 * 2**20)
    store = disk.folder / "store"
    docs = write_docs(tmp_path / "docs", 6, lines=10)
    args = ["precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"]), "--chunk-tokens", "512",
            "--codec", "raw"]  # objects of a known size: the disk fills part way
    res = runner.invoke(app, args)
    out = text(res.output)
    assert res.exit_code == 1, res.output
    planned = int(out.split(" documents → ")[1].split()[0])
    records = assert_consistent(store / "corpus", store)
    assert 0 < len(records) < planned and encoded(res.output) == len(records) == len(DiskStore(store).entries())
    assert f"{planned - len(records)} of {planned} chunks could not be stored" in out and "No space left on device" in out

    again = runner.invoke(app, args)  # still full: fails again, says so again
    assert again.exit_code == 1 and "could not be stored" in text(again.output) and encoded(again.output) == 0
    assert assert_consistent(store / "corpus", store) == records

    disk.grow(64 * 2**20)
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert encoded(done.output) == planned - len(records) and "skipped" in done.output
    assert len(assert_consistent(store / "corpus", store)) == planned


def test_manifest_on_a_full_disk_is_never_torn(tiny_models, tmp_path, small_disk):
    disk = small_disk("corpus", 1 * 2**20)
    corpus, store = disk.folder / "corpus", tmp_path / "store"
    first, second = write_docs(tmp_path / "first", 2), write_docs(tmp_path / "second", 6, lines=20, tag="more")
    base = ["--store", str(store), "--corpus", str(corpus), "--model", str(tiny_models["llama"])]
    assert runner.invoke(app, ["precompute", str(first), *base]).exit_code == 0
    before = manifest_records(corpus)
    disk.fill()
    res = runner.invoke(app, ["precompute", str(first), str(second), *base])
    out = text(res.output)
    assert res.exit_code == 1, res.output
    assert "to the manifest" in out and "No space left on device" in out and "Traceback" not in res.output
    records = manifest_records(corpus)  # whole lines only: those that fitted before the disk filled
    assert records[: len(before)] == before and len(records) < len(before) + 6
    res_verify = runner.invoke(app, ["store", "verify", str(store)])
    assert res_verify.exit_code == 0, res_verify.output
    # the index could not be saved on the full disk either (the message says so); what ask searches is the saved
    # index plus the recorded chunks it lacks, embedded on the fly: exactly the manifest's chunks
    assert "could not save the index" in out
    saved = ChunkIndex.load(corpus, {r.id: r for r in records})
    assert saved.keys() | {r.key for r in saved.behind} == {r.key for r in records}

    (corpus / "filler").unlink(missing_ok=True)
    disk.grow(16 * 2**20)
    done = runner.invoke(app, ["precompute", str(first), str(second), *base])
    assert done.exit_code == 0, done.output
    assert len(assert_consistent(corpus, store)) > len(before)


# -- kill -9 between a chunk's write and its manifest line ----------------------------------------------------
SLOW_DISK = """
import sys, time
from kvblend.store import DiskStore
put = DiskStore.put
DiskStore.put = lambda self, key, kv: (time.sleep(0.3), put(self, key, kv))[1]
from kvblend.cli import app
sys.argv = ["kvblend", *sys.argv[1:]]
app()
"""


def test_kill_9_never_leaves_the_manifest_ahead_of_the_store(tiny_models, tmp_path):
    docs = write_docs(tmp_path / "docs", 12, lines=30)
    store = tmp_path / "store"
    cmd = [sys.executable, "-c", SLOW_DISK, "precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"]),
           "--chunk-tokens", "256", "--no-index"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    manifest = store / "corpus" / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    records = manifest_records(store / "corpus")
    assert len(records) >= 3
    res = runner.invoke(app, ["store", "verify", str(store)])
    assert res.exit_code == 0, res.output
    stored = {e.key for e in DiskStore(store).entries()}
    assert {r.key for r in records} <= stored  # every recorded chunk is on disk


# -- several runs, concurrent runs ------------------------------------------------------------------------------
def test_a_second_run_adds_to_the_index(tiny_models, tmp_path):
    store = tmp_path / "store"
    first, second = write_docs(tmp_path / "first", 3), write_docs(tmp_path / "second", 2, tag="extra")
    base = ["--store", str(store), "--model", str(tiny_models["llama"]), "--chunk-tokens", "96"]
    assert runner.invoke(app, ["precompute", str(first), *base]).exit_code == 0
    after_first = {r.key for r in manifest_records(store / "corpus")}
    res = runner.invoke(app, ["precompute", str(second), *base])
    assert res.exit_code == 0, res.output
    records = assert_consistent(store / "corpus", store)
    assert after_first < {r.key for r in records} and {Path(r.source).parent.name for r in records} == {"first", "second"}
    from kvblend.corpus import CorpusFolder, Embedder

    index = CorpusFolder.for_store(str(store)).load_index()
    early = next(r for r in records if Path(r.source).parent.name == "first")
    assert index.search(Embedder(index.embedder), early.text, 1)[0].record.key == early.key  # earlier documents still found


def test_concurrent_precomputes_one_is_refused_naming_the_holder_and_the_index_covers_both(tiny_models, tmp_path):
    store = tmp_path / "store"
    shared = write_docs(tmp_path / "a", 20, lines=20)
    other = write_docs(tmp_path / "b", 20, lines=20, tag="other")
    for f in list(shared.iterdir())[:10]:  # overlapping folders, as two users adding documents would have
        shutil.copy(f, other / f.name)
    runs = [[*CLI, "precompute", str(folder), "--store", str(store), "--model", str(tiny_models["llama"]), "--chunk-tokens", "256",
             "--threads", "1"] for folder in (shared, other)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV) for cmd in runs]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = text(outs[[p.returncode for p in procs].index(2)])
    winner = procs[[p.returncode for p in procs].index(0)]
    assert "another precompute is writing to" in refused and f"pid {winner.pid} on {socket.gethostname()}" in refused
    assert_consistent(store / "corpus", store)
    loser = runs[[p.returncode for p in procs].index(2)]
    assert subprocess.run(loser, capture_output=True, env=ENV).returncode == 0
    records = assert_consistent(store / "corpus", store)
    assert {Path(r.source).name for r in records} == {f.name for f in shared.iterdir()} | {f.name for f in other.iterdir()}
