"""Serialized objects and the disk tier: codecs, layer-wise reads, damage, caps, LRU, the store CLI."""
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvblend.cli import app
from kvblend.store import ChunkKV, DiskStore, MemoryStore
from kvblend.store import disk as disk_module
from kvblend.store.codecs import CODECS, roundtrip
from kvblend.store.disk import ObjectTooLarge
from kvblend.store.format import HEAD_READ, CorruptObject, encode_object, parse_header

runner = CliRunner()
SHAPE = (4, 2, 24, 16)  # layers, kv heads, tokens, head dim


def make_kv(i: int, shape=SHAPE, dtype=torch.float32, fingerprint="model-a") -> ChunkKV:
    g = torch.Generator().manual_seed(i)
    return ChunkKV(f"{i:064x}", fingerprint, torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))


def dir_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                total += os.stat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                pass
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("codec", ["raw", "int8", "fp8"])
def test_codec_round_trip_error_and_size(codec, dtype):
    kv = make_kv(0, dtype=dtype)
    back = roundtrip(kv, codec)
    err = ((back.keys.float() - kv.keys.float()).abs().amax(-1) / kv.keys.float().abs().amax(-1)).max()
    assert back.keys.dtype == dtype and back.keys.shape == kv.keys.shape
    assert err == 0 if codec == "raw" else err < {"int8": 0.01, "fp8": 0.07}[codec]
    raw_size = CODECS["raw"].layer_nbytes(kv.layer_shape, dtype)
    size = CODECS[codec].layer_nbytes(kv.layer_shape, dtype)
    per_value = {"raw": dtype.itemsize, "int8": 1 + 4 / SHAPE[3], "fp8": 1 + 4 / SHAPE[3]}[codec]
    assert size == pytest.approx(raw_size * per_value / dtype.itemsize)


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_one_layer_reads_alone_by_position(tmp_path, codec):
    disk = DiskStore(tmp_path, codec=codec)
    kv = make_kv(1)
    disk.put(kv.key, kv)
    path = disk.path(kv.key)
    with open(path, "rb") as f:
        header = parse_header(lambda off, n: os.pread(f.fileno(), n, off), kv.key, str(path))
        blob = os.pread(f.fileno(), header.layer_nbytes, header.layer_offset(2))
    header.verify_layer(2, blob)
    k, v = CODECS[codec].decode(torch.frombuffer(bytearray(blob), dtype=torch.uint8), header.layer_shape, header.torch_dtype)
    expect = roundtrip(kv, codec)
    assert torch.equal(k, expect.keys[2]) and torch.equal(v, expect.values[2])
    assert header.total_nbytes == path.stat().st_size and header.fingerprint == "model-a" and header.codec == codec
    lazy = disk.get(kv.key)
    assert torch.equal(lazy.layer(1)[0], expect.keys[1]) and lazy.stats.bytes_read == 2 * header.layer_nbytes


def damage(disk: DiskStore, keys: list[str]) -> dict[str, str]:
    """Corrupt objects in the four ways a store meets: data bits, header bits, truncation, a swap."""
    p = [disk.path(k) for k in keys]
    with open(p[1], "r+b") as f:  # one flipped byte in the last layer
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    with open(p[2], "r+b") as f:  # the magic
        f.write(b"XXXX")
    with open(p[3], "r+b") as f:
        f.truncate(p[3].stat().st_size - 100)
    shutil.copy(p[0], p[4])  # another chunk's object under this key
    return {keys[1]: "checksum", keys[2]: "not a kvblend object", keys[3]: "truncated", keys[4]: "holds key"}


def test_damaged_objects_are_counted_misses_and_verify_lists_exactly_them(tmp_path):
    disk = DiskStore(tmp_path)
    kvs = [make_kv(i) for i in range(6)]
    for kv in kvs:
        disk.put(kv.key, kv)
    bad = damage(disk, [kv.key for kv in kvs[:5]])
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / ".leftover.tmp").write_bytes(b"half an object")  # a writer killed mid-write

    for key, why in bad.items():
        if why != "checksum":  # caught by the header / size check: a plain miss
            assert disk.get(key) is None and not disk.contains(key)
    assert disk.stats.corrupt == 3
    lazy = disk.get(kvs[1].key)  # data damage shows when the layer is read: recomputed, never served
    lazy.recompute = lambda: kvs[1]
    assert torch.equal(lazy.layer(3)[1], kvs[1].values[3]) and lazy.failed and disk.stats.corrupt == 4
    assert not disk.contains(kvs[1].key) and disk.get(kvs[1].key) is None  # precompute will write it again
    for good in (kvs[0], kvs[5]):
        assert torch.equal(disk.get(good.key).materialize().keys, good.keys)

    res = runner.invoke(app, ["store", "verify", str(tmp_path)])
    assert res.exit_code == 1
    listed = {line.split()[1]: line for line in res.output.splitlines() if line.startswith("bad ")}
    assert {Path(name).stem for name in listed} == set(bad), res.output
    for key, why in bad.items():
        assert why in listed[str(disk.path(key).relative_to(tmp_path))]
    assert runner.invoke(app, ["store", "verify", str(tmp_path), "--delete"]).exit_code == 1
    res = runner.invoke(app, ["store", "verify", str(tmp_path)])
    assert res.exit_code == 0 and "2 objects" in res.output


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_layers_are_checked_whole(tmp_path, monkeypatch, mapped):
    """Read in pieces (each hashed as it lands) or mapped (hashed in place), damage anywhere in a
    layer, or a file cut short after it was opened (its size check passed), makes the chunk a
    recompute: never zeros, never stale bytes."""
    monkeypatch.setattr(disk_module, "READ_PIECE", 1000)  # 6 KiB layers: 7 pieces, the last one partial
    disk = DiskStore(tmp_path, mmap=mapped)
    kvs = [make_kv(i) for i in range(3)]
    for kv in kvs:
        disk.put(kv.key, kv)
    assert torch.equal(disk.get(kvs[0].key).materialize().values, kvs[0].values)
    header = disk.get(kvs[1].key).header
    with open(disk.path(kvs[1].key), "r+b") as f:  # one flipped bit in the third piece of layer 2
        f.seek(header.layer_offset(2) + 2500)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    damaged, cut = disk.get(kvs[1].key), disk.get(kvs[2].key)
    os.truncate(disk.path(kvs[2].key), header.layer_offset(1) + 1500)
    for lazy, kv in ((damaged, kvs[1]), (cut, kvs[2])):
        lazy.recompute = lambda kv=kv: kv
        lazy.load_through(0)
        # a read finds the cut at layer 1; a map sees the file's size before it exposes any byte
        assert lazy.failed == (mapped and lazy is cut)
        assert torch.equal(lazy.layer(3)[0], kv.keys[3]) and lazy.failed
    assert disk.stats.corrupt == 2
    assert disk.stats.bytes_read == header.layer_nbytes * (4 + 2 + (0 if mapped else 1))  # the sound layers only


def test_mapped_reads_survive_replacement_and_hand_the_tiers_above_a_copy(tmp_path):
    """A mapped chunk keeps the bytes it verified when its file is replaced or removed, and what
    it passes up on completion is memory of its own, not the map."""
    disk = DiskStore(tmp_path)
    kv, other = make_kv(1), make_kv(2)
    disk.put(kv.key, kv)
    lazy = disk.get(kv.key)
    lazy.load_through(1)
    elsewhere = DiskStore(tmp_path / "elsewhere")
    elsewhere.put(kv.key, other)
    os.replace(elsewhere.path(kv.key), disk.path(kv.key))  # another writer renames its object over this one
    handed = []
    lazy.on_complete = lambda got, recomputed: handed.append(got)
    assert torch.equal(lazy.materialize().keys, kv.keys) and not lazy.failed
    disk.path(kv.key).unlink()
    assert torch.equal(lazy.layer(2)[1], kv.values[2])
    (got,) = handed
    assert torch.equal(got.keys, kv.keys) and got.keys.untyped_storage().data_ptr() != lazy.materialize().keys.untyped_storage().data_ptr()


def test_foreign_and_random_files_are_misses(tmp_path):
    disk = DiskStore(tmp_path)
    key = make_kv(7).key
    disk.path(key).parent.mkdir(parents=True)
    disk.path(key).write_bytes(os.urandom(HEAD_READ + 10))
    assert disk.get(key) is None
    header, _ = encode_object(make_kv(8), "raw")
    with pytest.raises(CorruptObject, match="format version"):
        data = bytearray(header.to_bytes())
        data[4] = 9
        parse_header(lambda off, n: bytes(data[off : off + n]), None, "v9")
    with pytest.raises(ValueError, match="invalid store key"):
        disk.path("../../etc/passwd")


def test_disk_cap_is_never_exceeded_and_eviction_is_lru(tmp_path):
    probe = DiskStore(tmp_path / "probe")
    probe.put(make_kv(0).key, make_kv(0))
    cap = int(dir_bytes(probe.root) * 3.5)
    disk = DiskStore(tmp_path / "capped", max_bytes=cap)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], dir_bytes(disk.root))

    sampler = threading.Thread(target=sample)
    sampler.start()
    kvs = [make_kv(i) for i in range(8)]
    try:
        for i, kv in enumerate(kvs):
            disk.put(kv.key, kv)
            if i >= 1:
                assert disk.get(kvs[0].key) is not None  # keep chunk 0 recently used
                time.sleep(0.01)  # access times must differ
    finally:
        stop.set()
        sampler.join()
    assert 0 < peak[0] <= cap
    assert dir_bytes(disk.root) <= cap and disk.stats.evictions == 5
    assert disk.contains(kvs[0].key) and disk.contains(kvs[7].key) and not disk.contains(kvs[1].key)
    big = make_kv(99, shape=(4, 2, 200, 16))
    with pytest.raises(ObjectTooLarge, match="exceeds the tier cap"):
        disk.put(big.key, big)  # larger than the whole tier: refused, nothing evicted for it
    assert not disk.contains(big.key) and disk.contains(kvs[0].key)


def test_memory_cap_is_never_exceeded_and_eviction_is_lru():
    kvs = [make_kv(i) for i in range(6)]
    cap = int(kvs[0].nbytes * 2.5)
    mem = MemoryStore(max_bytes=cap)
    for i, kv in enumerate(kvs):
        mem.put(kv.key, kv)
        mem.get(kvs[0].key)
        assert mem.used_bytes <= cap and sum(x.nbytes for x in mem._items.values()) == mem.used_bytes
    assert mem.contains(kvs[0].key) and mem.contains(kvs[5].key) and len(mem) == 2
    assert mem.stats.evictions == 4


def test_cli_ls_stats_gc(tmp_path):
    disk = DiskStore(tmp_path)
    for i in range(4):
        disk.put(make_kv(i).key, make_kv(i))
        time.sleep(0.01)
    res = runner.invoke(app, ["store", "ls", str(tmp_path)])
    assert res.exit_code == 0 and res.output.count("float32") == 4 and "raw" in res.output
    res = runner.invoke(app, ["store", "stats", str(tmp_path)])
    assert res.exit_code == 0 and "disk" in res.output and "4" in res.output
    one = disk.entries()[0].size
    res = runner.invoke(app, ["store", "gc", str(tmp_path), "--max-bytes", str(2 * one)])
    assert res.exit_code == 0 and "removed 2 objects" in res.output
    assert disk.contains(make_kv(3).key) and not disk.contains(make_kv(0).key)
    assert runner.invoke(app, ["store", "gc", str(tmp_path), "--max-bytes", "lots"]).exit_code == 2
    res = runner.invoke(app, ["store", "recode", str(tmp_path), "--codec", "int8"])
    assert res.exit_code == 0 and "recoded 2 objects" in res.output
    assert disk.get(make_kv(3).key).header.codec == "int8" and disk.entries()[0].size < one / 3
    assert torch.equal(disk.get(make_kv(3).key).materialize().keys, roundtrip(make_kv(3), "int8").keys)
    assert runner.invoke(app, ["store", "recode", str(tmp_path), "--codec", "zip"]).exit_code == 2
    assert runner.invoke(app, ["store", "verify", str(tmp_path / "nope")]).exit_code == 2
