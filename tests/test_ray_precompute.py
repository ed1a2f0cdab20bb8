"""Distributed precompute on a real local Ray cluster (tiny model, 2 CPUs): same keys and bytes as the
single-process path, and nothing lost when an actor or the driver is killed mid-run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("ray.data", reason="Ray is not installed (pip install 'kvblend[ray]')")

from kvblend.cli import app  # noqa: E402
from kvblend.corpus import Manifest  # noqa: E402
from kvblend.store import open_store  # noqa: E402
from test_corpus import SENTENCES, manifest_lines, text  # noqa: E402

runner = CliRunner()


def make_docs(root: Path, files: int, lines: int) -> Path:
    root.mkdir()
    for i in range(files):
        (root / f"{i:02d}.txt").write_text(" ".join(f"Doc {i} line {j}: {SENTENCES[(i + j) % len(SENTENCES)]}" for j in range(lines)))
    return root


def objects(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.rglob("*.kvb")}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from kvblend.cli import app; app()", *args]


def verify_clean(store: Path) -> None:
    res = runner.invoke(app, ["store", "verify", str(store)])
    assert res.exit_code == 0, res.output
    kv = open_store(str(store))
    assert all(kv.contains(r["key"]) for r in manifest_lines(store))  # the manifest never runs ahead of the store


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local cluster for the in-process runs of this module, shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_precompute_gives_the_single_process_keys_bytes_and_answer(tiny_models, tmp_path):
    docs = make_docs(tmp_path / "docs", files=4, lines=12)
    model = str(tiny_models["llama"])
    single, spread = tmp_path / "single", tmp_path / "spread"
    common = ["--model", model, "--chunk-tokens", "128", "--threads", "1"]
    res = runner.invoke(app, ["precompute", str(docs), "--store", str(single), *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["precompute", str(docs), "--store", str(spread), *common, "--ray", "local", "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "encoded" in text(res) and "failed" not in text(res)
    by_id = [{r["id"]: r["key"] for r in manifest_lines(store)} for store in (single, spread)]  # in the order batches end
    assert by_id[0] == by_id[1] and len(by_id[0]) == len(manifest_lines(spread))
    assert objects(single) == objects(spread) and len(objects(single)) > 4
    question = ["ask", "How many lamps does the amber lighthouse keep lit?", "--model", model, "--max-new-tokens", "6", "--top-k", "2"]
    answers = [runner.invoke(app, [*question, "--store", str(store)]) for store in (single, spread)]
    assert all(a.exit_code == 0 for a in answers), answers[1].output
    assert answers[0].output.split("\n")[-3:] == answers[1].output.split("\n")[-3:]


def _run_until(cmd: list[str], manifest: Path, lines: int, then) -> subprocess.Popen:
    """Start `cmd` in its own session; once the manifest has `lines` lines, call then(proc)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "COLUMNS": "120"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= lines:
            then(proc)
            break
        time.sleep(0.02)
    return proc


def test_a_killed_actor_is_restarted_and_its_batch_retried(tiny_models, tmp_path):
    import psutil

    docs = make_docs(tmp_path / "docs", files=60, lines=12)
    store = tmp_path / "store"
    cmd = cli("precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"]), "--chunk-tokens", "64",
              "--threads", "1", "--no-index", "--ray", "local", "--workers", "1")
    killed = []

    def kill_an_actor(proc):
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "ChunkEncoder" in " ".join(p.cmdline()):
                    p.kill()
                    killed.append(p.pid)
                    return
            except psutil.Error:
                continue

    proc = _run_until(cmd, store / "corpus" / "manifest.jsonl", 8, kill_an_actor)
    _, err = proc.communicate(timeout=300)
    assert killed, "no encoding actor was found to kill"
    assert proc.returncode == 0, err.decode()[-3000:]
    lines = manifest_lines(store)
    assert len({r["id"] for r in lines}) == len(lines) and len(lines) >= 60
    verify_clean(store)
    again = runner.invoke(app, ["precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"]),
                                "--chunk-tokens", "64", "--no-index"])
    assert again.exit_code == 0 and "encoded 0 chunks" in text(again), again.output


def test_a_killed_driver_leaves_a_store_the_rerun_completes(tiny_models, tmp_path):
    docs = make_docs(tmp_path / "docs", files=60, lines=12)
    store = tmp_path / "store"
    manifest = store / "corpus" / "manifest.jsonl"
    cmd = cli("precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"]), "--chunk-tokens", "64",
              "--threads", "1", "--no-index", "--ray", "local")
    proc = _run_until(cmd, manifest, 8, lambda p: os.killpg(p.pid, signal.SIGKILL))
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    kept = len(Manifest(manifest).records)
    verify_clean(store)

    res = runner.invoke(app, ["precompute", str(docs), "--store", str(store), "--model", str(tiny_models["llama"]),
                              "--chunk-tokens", "64", "--no-index", "--ray", "local"])
    assert res.exit_code == 0, res.output
    total = len(manifest_lines(store))
    skipped = int(text(res).split("skipped ")[-1].split()[0])
    assert kept < total and skipped >= kept
    verify_clean(store)
