import os
import sys
from pathlib import Path

import pytest

import kvblend  # noqa: F401  (before torch: it sets GOMP_SPINCOUNT, which libgomp reads when torch loads it)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import ARCHS, make_tiny_model  # noqa: E402

torch.set_num_threads(int(os.environ.get("KVBLEND_TEST_THREADS", "2")))
# vLLM's CPU worker (tests/test_vllm_*.py): up to two of this machine's cores, none held back for its
# scheduler process; its spawned processes and `kvblend serve` inherit this.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0))[:2])))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-weight model folder per supported architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The evaluation data shipped with kvblend: musique_dev.json and cacheblend/1.json ... 10.json."""
    from kvblend.eval.datasets import bundled_dir

    return bundled_dir()


@pytest.fixture(scope="session")
def real_kb():
    """The real default model (SmolLM2-135M, fp32) with an in-memory store; pulled on first use."""
    from kvblend import KVBlend

    return KVBlend()


@pytest.fixture()
def slow_disk_writes(monkeypatch):
    """Disk tier puts take 0.2 s, so a write still in the background when a check runs is caught."""
    import time

    from kvblend.store import DiskStore

    put = DiskStore.put

    def slow_put(self, key, kv):
        time.sleep(0.2)
        put(self, key, kv)

    monkeypatch.setattr(DiskStore, "put", slow_put)
