"""Codecs in a shared tier: a store serves only objects in its own codec; the compact codecs' sizes and errors."""
import logging
import os
import uuid

import pytest
import torch

from kvblend.config import StoreConfig
from kvblend.store import ChunkKV, DiskStore, open_store
from kvblend.store.codecs import CODECS, roundtrip

REDIS_URL = os.environ.get("KVBLEND_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="KVBLEND_TEST_REDIS_URL is unset: scripts/test.sh starts a loopback redis-server and sets it")


def make_kv(seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    key = uuid.uuid4().hex + uuid.uuid4().hex  # unique per run: the test server may be shared
    return ChunkKV(key, "model-a", torch.randn((3, 2, 64, 64), generator=g), torch.randn((3, 2, 64, 64), generator=g))


def instance(codec: str, **where) -> "object":
    """One kvblend instance's store: no CPU tier (every get reads the shared tier), synchronous writes."""
    return open_store(StoreConfig(codec=codec, cpu_bytes=0, async_writes=False, **where))


def values(found) -> tuple[torch.Tensor, torch.Tensor]:
    kv = found.materialize() if hasattr(found, "materialize") else found
    return kv.keys, kv.values


@pytest.mark.parametrize("shared", ["disk", pytest.param("redis", marks=needs_redis)])
def test_a_store_never_serves_another_codecs_object(tmp_path, shared, caplog):
    where = {"disk_dir": str(tmp_path)} if shared == "disk" else {"remote_url": REDIS_URL}
    quantized, raw = instance("int8", **where), instance("raw", **where)
    kv = make_kv()
    quantized.put(kv.key, kv)
    assert quantized.get(kv.key) is not None
    with caplog.at_level(logging.WARNING):
        assert raw.get(kv.key) is None  # before the codec check it served int8 values to a raw reader
    assert "stored in codec int8, this store is configured for raw" in caplog.text
    raw.put(kv.key, kv)  # the raw instance recomputes and its write replaces the object
    k, v = values(raw.get(kv.key))
    assert torch.equal(k, kv.keys) and torch.equal(v, kv.values)
    again = instance("int8", **where)  # a fresh int8 instance (the first one remembers the key as bad)
    assert again.get(kv.key) is None
    for store in (quantized, raw, again):
        store.close()


def test_maintenance_reads_every_codec(tmp_path):
    kv = make_kv()
    instance("int4", disk_dir=str(tmp_path)).put(kv.key, kv)
    lazy = DiskStore(tmp_path).get(kv.key)  # ls / verify / recode open the folder with no expectation
    assert lazy is not None and lazy.header.codec == "int4"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_error_and_size(dtype):
    kv = make_kv(1)
    kv = ChunkKV(kv.key, kv.fingerprint, kv.keys.to(dtype), kv.values.to(dtype))
    back = roundtrip(kv, "int4")
    assert back.dtype == dtype and back.keys.shape == kv.keys.shape
    err = ((back.keys.float() - kv.keys.float()).norm() / kv.keys.float().norm()).item()
    assert 0 < err < 0.12  # 4 bits with a scale per 32 values: ~8% relative error on Gaussian data
    heads, tokens, dim = kv.layer_shape
    per_value = CODECS["int4"].layer_nbytes(kv.layer_shape, dtype) / (2 * heads * tokens * dim)
    assert per_value == pytest.approx(0.5 + 2 / 32)  # a nibble, and one fp16 scale per group of 32 (64 tokens: whole groups)


def test_int4_handles_odd_head_dims_and_zeros():
    kv = ChunkKV("ab" * 32, "m", torch.zeros((1, 1, 5, 40)), torch.randn((1, 1, 5, 40)))
    back = roundtrip(kv, "int4")
    assert torch.equal(back.keys, kv.keys) and (back.values - kv.values).abs().max() < 0.5


def test_int4_keys_are_grouped_per_channel():
    """An outlier channel (as keys have) costs the other channels nothing: each channel has its own scales."""
    g = torch.Generator().manual_seed(2)
    k = torch.randn((2, 40, 64), generator=g)
    k[:, :, 5] *= 50
    kv = ChunkKV("cd" * 32, "m", k[None], torch.randn((1, 2, 40, 64), generator=g))
    back = roundtrip(kv, "int4").keys[0]
    others = [c for c in range(64) if c != 5]
    err = ((back[..., others] - k[..., others]).norm() / k[..., others].norm()).item()
    assert err < 0.15


def test_persistent_tiers_default_to_a_compact_codec(monkeypatch):
    from kvblend.config import PERSISTENT_CODEC

    monkeypatch.delenv("KVBLEND_CODEC", raising=False)
    assert PERSISTENT_CODEC != "raw"
    assert StoreConfig().codec == "raw"  # memory alone: nothing to save, no quantization
    assert StoreConfig(disk_dir="/tmp/kv").codec == PERSISTENT_CODEC
    assert StoreConfig.from_spec("redis://127.0.0.1:6379/0").codec == PERSISTENT_CODEC
    assert StoreConfig(disk_dir="/tmp/kv", codec="raw").codec == "raw"  # raw stays available
    monkeypatch.setenv("KVBLEND_CODEC", "fp8")
    assert StoreConfig(disk_dir="/tmp/kv").codec == "fp8"
