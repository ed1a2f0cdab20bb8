"""Several processes on one store: a precompute killed midway resumes, concurrent writers leave a clean store."""
import os
import signal
import subprocess
import sys

from typer.testing import CliRunner

from kvblend import KVBlend
from kvblend.cli import app
from kvblend.store import DiskStore

PASSAGE = "{prefix} passage {i}: " + "the quick brown fox jumps over the lazy dog. " * 12
WORKER = f"""
import sys, time, torch
from kvblend import KVBlend
torch.set_num_threads(1)
model, store, prefix, first, last, pause = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
kb = KVBlend(model=model, store=store)
texts = [{PASSAGE!r}.format(prefix=prefix, i=i) for i in range(first, last)]
kb.precompute(texts, on_chunk=lambda n, computed: (print("chunk", computed, flush=True), time.sleep(pause)))
"""


def passage(prefix: str, i: int) -> str:
    return PASSAGE.format(prefix=prefix, i=i)


def run_worker(model, store, prefix: str, first: int, last: int, pause: float = 0.0, env: dict | None = None, **popen) -> subprocess.Popen:
    """A separate process precomputing passages first..last-1 into `store`; prints a line per chunk."""
    return subprocess.Popen([sys.executable, "-c", WORKER, str(model), str(store), prefix, str(first), str(last), str(pause)],
                            env={**os.environ, **(env or {})}, **popen)


def test_killed_precompute_leaves_a_consistent_store_and_resumes(tiny_models, tmp_path):
    store = tmp_path / "store"
    proc = run_worker(tiny_models["llama"], store, "p", 0, 40, pause=0.05, stdout=subprocess.PIPE, text=True)
    for _ in range(5):
        assert proc.stdout.readline().startswith("chunk")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert CliRunner().invoke(app, ["store", "verify", str(store)]).exit_code == 0
    stored = len(DiskStore(store).entries())
    assert 0 < stored < 40
    kb = KVBlend(model=str(tiny_models["llama"]), store=str(store))
    computed = []
    kb.precompute([passage("p", i) for i in range(40)], on_chunk=lambda n, c: computed.append(c))
    kb.store.close()
    assert sum(computed) == 40 - stored
    assert len(DiskStore(store).entries()) == 40


def test_concurrent_precomputes_into_one_directory_verify_clean(tiny_models, tmp_path):
    store = tmp_path / "shared"
    env = {"KVBLEND_DISK_BYTES": "1GiB"}  # a cap: writers also take the directory lock
    procs = [run_worker(tiny_models["llama"], store, "p", a, b, stdout=subprocess.DEVNULL, env=env) for a, b in [(0, 10), (5, 15), (0, 15)]]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    res = CliRunner().invoke(app, ["store", "verify", str(store)])
    assert res.exit_code == 0 and "15 objects" in res.output
    assert not list(store.rglob("*.tmp"))
