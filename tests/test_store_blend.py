"""The store under the blend (tiny model): disk-resident = memory-resident, damage never changes an answer."""
import os

import pytest
import torch
from typer.testing import CliRunner

from kvblend import KVBlend
from kvblend.cli import app
from kvblend.config import StoreConfig
from kvblend.store import MemoryStore, open_store

CHUNKS = [
    "Alice keeps the spare key under the blue flowerpot by the back door.",
    "The train to Lyon leaves at seven; the one to Turin leaves at nine.",
    "Bob's favourite number is forty-two, and he writes it on every page.",
]
QUESTION = "Where is the spare key?"


@pytest.fixture(scope="module")
def kb(tiny_models):
    return KVBlend(model=str(tiny_models["llama"]))


@pytest.fixture()
def disk_kb(kb, tmp_path):
    """kb over a disk-only store holding CHUNKS (no memory tier: every hit is read from disk)."""
    original = kb.store
    kb.store = open_store(StoreConfig(disk_dir=str(tmp_path), cpu_bytes=0, codec="raw"))
    kb.precompute(CHUNKS)
    kb.store.flush()
    yield kb
    kb.store.close()
    kb.store = original


def reference_logits(kb, chunks=CHUNKS):
    kb.precompute(chunks)
    return kb.prefill(CHUNKS, QUESTION).logits


@pytest.mark.parametrize("codec", ["raw", "int8"])
@pytest.mark.parametrize("depth", [0, 2])
def test_disk_resident_blend_equals_memory_resident(kb, tmp_path, depth, codec):
    original = kb.store
    kb.store = open_store(StoreConfig(codec=codec))
    expected = reference_logits(kb)
    kb.store = open_store(StoreConfig(disk_dir=str(tmp_path), cpu_bytes=0, prefetch_layers=depth, codec=codec))
    kb.config.store.prefetch_layers = depth
    try:
        kb.precompute(CHUNKS)
        kb.store.flush()
        pre = kb.prefill(CHUNKS, QUESTION)
        assert pre.stats.chunk_hits == 3 and torch.equal(pre.logits, expected)
        assert kb.store.stats()["disk"]["hits"] >= 3
    finally:
        kb.store.close()
        kb.store, kb.config.store.prefetch_layers = original, 2


def test_damaged_layer_is_recomputed_and_healed(disk_kb, tmp_path):
    expected = disk_kb.prefill(CHUNKS, QUESTION).logits
    disk = disk_kb.store.serialized[0]
    path = disk.path(disk_kb.key_for(disk_kb.builder.encode(CHUNKS[1])))
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff" * 8)
    assert CliRunner().invoke(app, ["store", "verify", str(tmp_path)]).exit_code == 1
    pre = disk_kb.prefill(CHUNKS, QUESTION)
    assert torch.equal(pre.logits, expected) and disk.stats.corrupt == 1
    disk_kb.store.flush()  # the recomputed chunk was written back
    assert CliRunner().invoke(app, ["store", "verify", str(tmp_path)]).exit_code == 0
    assert torch.equal(disk_kb.prefill(CHUNKS, QUESTION).logits, expected)


def test_damaged_header_is_a_miss_with_a_correct_answer(disk_kb, kb):
    disk = disk_kb.store.serialized[0]
    with open(disk.path(disk_kb.key_for(disk_kb.builder.encode(CHUNKS[0]))), "r+b") as f:
        f.write(b"\0" * 16)
    pre = disk_kb.prefill(CHUNKS, QUESTION)
    assert (pre.stats.chunk_hits, pre.stats.chunk_misses) == (2, 1) and disk.stats.corrupt == 1
    store, disk_kb.store = disk_kb.store, MemoryStore()
    try:
        expected = reference_logits(disk_kb, CHUNKS[1:])  # the same blend with chunk 0 never cached
    finally:
        disk_kb.store = store
    assert torch.equal(pre.logits, expected)
    assert not disk_kb.store.contains(disk_kb.key_for(disk_kb.builder.encode(CHUNKS[0])))
    assert disk_kb.precompute(CHUNKS) and disk_kb.store.contains(disk_kb.key_for(disk_kb.builder.encode(CHUNKS[0])))


def test_closing_kvblend_lands_background_writes_and_leaves_a_callers_store_open(tiny_models, tmp_path, slow_disk_writes):
    from kvblend.store import DiskStore

    with KVBlend(model=str(tiny_models["llama"]), store=str(tmp_path / "own")) as own:
        own.precompute(CHUNKS)
    assert len(DiskStore(tmp_path / "own").entries()) == 3  # slow writes landed before close returned
    with pytest.raises(RuntimeError, match="closed store"):
        own.store.put("x", None)
    callers = open_store(StoreConfig(disk_dir=str(tmp_path / "callers")))
    with KVBlend(model=str(tiny_models["llama"]), store=callers) as borrowed:
        borrowed.precompute(CHUNKS[:1])
    assert len(DiskStore(tmp_path / "callers").entries()) == 1
    borrowed.precompute(CHUNKS[1:])  # the caller's store is flushed, not closed
    callers.close()
    assert len(DiskStore(tmp_path / "callers").entries()) == 3
