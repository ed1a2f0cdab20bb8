"""The tiered store: configuration, write-behind, promotion, flush at exit, prefetch, the loading controller."""
import gc
import subprocess
import sys
import threading
import time

import pytest
import torch

from kvblend.config import BlendConfig, KVBlendConfig, StoreConfig
from kvblend.store import ChunkKV, DiskStore, LazyChunk, LoadingController, MemoryStore, open_store, start_prefetch
from kvblend.store.codecs import roundtrip

SHAPE = (6, 2, 32, 16)


def make_kv(i: int) -> ChunkKV:
    g = torch.Generator().manual_seed(i)
    return ChunkKV(f"{i:064x}", "model-a", torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g))


def test_config_from_strings_env_and_yaml(tmp_path, monkeypatch):
    assert KVBlendConfig(store=str(tmp_path)).store.disk_dir == str(tmp_path)
    assert KVBlendConfig(store="redis://127.0.0.1:6379/2").store.remote_url == "redis://127.0.0.1:6379/2"
    assert KVBlendConfig().store == StoreConfig() and StoreConfig().disk_dir is None
    monkeypatch.setenv("KVBLEND_CPU_BYTES", "1MiB")
    monkeypatch.setenv("KVBLEND_DISK_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("KVBLEND_DISK_BYTES", "2GB")
    monkeypatch.setenv("KVBLEND_CODEC", "int8")
    cfg = StoreConfig()
    assert (cfg.cpu_bytes, cfg.disk_dir, cfg.disk_bytes, cfg.codec) == (2**20, str(tmp_path / "env"), 2 * 10**9, "int8")
    assert StoreConfig(cpu_bytes=5).cpu_bytes == 5  # explicit beats the environment
    yaml_file = tmp_path / "kv.yaml"
    yaml_file.write_text("store:\n  cpu_bytes: 64MiB\n  disk_dir: /tmp/x\n  prefetch_layers: 0\n")
    cfg = KVBlendConfig(store=str(yaml_file)).store
    assert (cfg.cpu_bytes, cfg.disk_dir, cfg.prefetch_layers, cfg.codec) == (64 * 2**20, "/tmp/x", 0, "int8")
    with pytest.raises(ValueError, match="remote_url"):
        StoreConfig(remote_url="http://x")
    with pytest.raises(ValueError, match="codec"):
        StoreConfig(codec="zip")
    yaml_file.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="kv.yaml"):
        StoreConfig.from_spec(str(yaml_file))
    with pytest.raises(ValueError, match="auto"):
        BlendConfig(recompute_ratio="auto", check_layers=[])
    assert BlendConfig(recompute_ratio="auto").recompute_ratio == "auto"


class GatedDisk(DiskStore):
    """A disk tier whose writes wait for a gate: write-behind made observable."""

    gate = threading.Event()

    def put(self, key, kv):
        self.gate.wait(10)
        super().put(key, kv)


def test_writes_go_behind_and_stay_visible_until_flushed(tmp_path):
    store = open_store(StoreConfig(disk_dir=str(tmp_path), cpu_bytes=0, codec="raw"))
    disk = GatedDisk(tmp_path)
    store.serialized[0] = store.tiers[0] = disk
    kv = make_kv(0)
    t0 = time.perf_counter()
    store.put(kv.key, kv)
    assert time.perf_counter() - t0 < 1  # precompute does not wait for the slow tier
    assert store.contains(kv.key) and store.get(kv.key) is kv and not disk.path(kv.key).exists()
    disk.gate.set()
    store.close()
    assert disk.path(kv.key).exists() and DiskStore(tmp_path).verify(DiskStore(tmp_path).entries()[0]) is None
    with pytest.raises(RuntimeError, match="closed"):
        store.put(kv.key, kv)


def test_pending_writes_are_flushed_at_interpreter_exit(tmp_path):
    code = f"""
import torch
from kvblend.store import ChunkKV, open_store
store = open_store({str(tmp_path)!r})
for i in range(3):
    store.put(f"{{i:064x}}", ChunkKV(f"{{i:064x}}", "m", torch.ones(2, 1, 400, 64), torch.ones(2, 1, 400, 64)))
"""  # no close(): atexit must flush
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    disk = DiskStore(tmp_path)
    assert len(disk.entries()) == 3 and all(disk.verify(e) is None for e in disk.entries())
    assert "cpu" in (tmp_path / "stats.json").read_text()


def test_lower_tier_hit_is_promoted_and_counted(tmp_path):
    kv = make_kv(1)
    with open_store(StoreConfig(disk_dir=str(tmp_path), codec="raw")) as writer:
        writer.put(kv.key, kv)
    store = open_store(StoreConfig(disk_dir=str(tmp_path), codec="raw"))
    cpu, disk = store.tiers
    got = store.get(kv.key)
    assert isinstance(got, LazyChunk) and not cpu.contains(kv.key)
    assert torch.equal(got.materialize().values, kv.values)
    assert cpu.contains(kv.key) and store.get(kv.key) is cpu.get(kv.key)
    assert store.get(make_kv(2).key) is None
    s = store.stats()
    assert (s["cpu"]["hits"], s["cpu"]["misses"], s["disk"]["hits"], s["disk"]["misses"]) == (1, 2, 1, 1)
    assert s["disk"]["bytes_read"] > 0 and s["disk"]["read_gbps"] > 0
    store.discard(kv.key, "test")
    assert not store.contains(kv.key) and store.stats()["rejected"] == 1


def test_codec_store_serves_the_same_values_from_every_tier(tmp_path):
    kv = make_kv(3)
    store = open_store(StoreConfig(disk_dir=str(tmp_path), codec="int8"))
    store.put(kv.key, kv)
    store.flush()
    from_cpu = store.get(kv.key)
    from_disk = DiskStore(tmp_path).get(kv.key).materialize()
    assert torch.equal(from_cpu.keys, from_disk.keys) and torch.equal(from_cpu.keys, roundtrip(kv, "int8").keys)
    assert not torch.equal(from_cpu.keys, kv.keys)
    store.close()


def test_prefetch_reads_ahead_boundedly_and_ends_when_abandoned(tmp_path):
    disk = DiskStore(tmp_path)
    kvs = [make_kv(i) for i in range(3)]
    for kv in kvs:
        disk.put(kv.key, kv)
    lazies = [disk.get(kv.key) for kv in kvs]
    prefetcher = start_prefetch(lazies + [kvs[0]], depth=2, device="cpu")
    deadline = time.time() + 5
    while any(c._loaded < 2 for c in lazies) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert [c._loaded for c in lazies] == [2, 2, 2]  # layers 0..1 only: nothing asked yet
    assert torch.equal(lazies[1].layer(3)[0], kvs[1].keys[3])
    while any(c._loaded < 6 for c in lazies) and time.time() < deadline:
        time.sleep(0.01)
    assert [c._loaded for c in lazies] == [6, 6, 6]  # 3 + depth 2 + 1
    prefetcher.join(1)
    assert not prefetcher._thread.is_alive()
    abandoned = start_prefetch([disk.get(kvs[0].key)], depth=1, device="cpu")  # its chunk is dropped at once
    gc.collect()
    abandoned.join(3)
    assert not abandoned._thread.is_alive()
    assert start_prefetch(lazies, depth=0, device="cpu") is None


def test_controller_picks_ratio_from_measured_load_and_prefill(tiny_models, tmp_path):
    from kvblend import KVBlend

    kb = KVBlend(model=str(tiny_models["llama"]), store=open_store(StoreConfig(disk_dir=str(tmp_path), cpu_bytes=0)))
    controller = LoadingController(min_ratio=0.1)
    prefill_s = controller.prefill_seconds(kb.adapter, 1000)
    assert prefill_s > 0 and controller.prefill_seconds(kb.adapter, 2000) == pytest.approx(2 * prefill_s)
    cfg = BlendConfig(recompute_ratio="auto")
    assert controller.resolve(cfg, [], 1000, kb.adapter).recompute_ratio == 0.1  # nothing to load
    assert controller.resolve(BlendConfig(recompute_ratio=0.3), [], 10, kb.adapter).recompute_ratio == 0.3
    [key] = kb.precompute(["A chunk long enough to take some time to read back from the disk tier. " * 4])
    kb.store.flush()
    lazy = kb.store.get(key)
    lazy.stats.add(bytes_read=10**6, read_s=10.0)  # pretend a slow tier: 100 kB/s
    ratio = controller.resolve(cfg, [lazy], 1000, kb.adapter).recompute_ratio
    expected = min(1.0, max(0.1, lazy.nbytes / lazy.stats.bandwidth() / prefill_s))
    assert ratio == pytest.approx(expected) and ratio > 0.1
    assert controller.summary()["last"]["ratio"] == ratio
    chunks = ["A chunk long enough to take some time to read back from the disk tier. " * 4]
    pre = kb.prefill(chunks, "Why?", config=cfg)
    assert pre.stats.chunk_hits == 1 and kb.store.stats()["controller"]["choices"] == 1
    chosen = kb.store.controller.history[-1].ratio
    assert pre.stats.recompute_ratio == chosen > kb.store.controller.min_ratio  # the request reports its choice
    assert pre.stats.as_dict()["recompute_ratio"] == chosen
    assert kb.prefill(chunks, "Why?", "reuse").stats.recompute_ratio == 0.0
    assert kb.prefill(chunks, "Why?", "full").stats.recompute_ratio is None


def test_memory_store_on_its_own_still_works():
    mem = MemoryStore()
    kv = make_kv(4)
    mem.put(kv.key, kv)
    assert mem.get(kv.key) is kv and mem.contains(kv.key) and len(mem) == 1


def test_bandwidth_bench_pairs_each_tier_with_its_plain_read(tmp_path):
    from kvblend.eval.bench_store import bandwidth

    rows = bandwidth(tmp_path / "bw", total_bytes=2**20, repeats=1)
    assert [(r.what, r.reference) for r in rows] == [
        ("disk tier, cold", "dd, cold"), ("disk tier, warm", "dd, warm"),
        ("disk tier, warm", "preadv into memory, warm"), ("cpu tier", "torch copy_")]
    assert all(r.gbps > 0 and r.reference_gbps > 0 and r.share > 0 for r in rows)
    assert not (tmp_path / "bw").exists()
