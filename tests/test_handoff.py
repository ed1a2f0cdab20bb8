"""The hand-off file between the blend and vLLM's worker: readable by safetensors, reused once loaded."""
import os

import pytest
import torch
from safetensors import safe_open

from kvblend.engines.vllm_handoff import SPARES, HandoffDir, layer_kv, prompt_digest


def _write(hd, ids, keys, values):
    """What the engine does: fill the hand-off's views in place."""
    with hd.filling(ids, len(keys), keys[0].shape[0], keys[0].shape[2], keys[0].dtype) as (key, layers):
        for (k, v), src_k, src_v in zip(layers, keys, values):
            k.copy_(src_k)
            v.copy_(src_v)
        del layers, k, v
    return key


def _kv(layers: int, n: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(3, n, 8, generator=g).to(dtype) for _ in range(layers)]
    values = [torch.randn(3, n, 8, generator=g).to(dtype) for _ in range(layers)]
    return keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_written_file_reads_back_exactly(tmp_path, dtype):
    hd = HandoffDir(tmp_path)
    ids = list(range(100, 117))
    keys, values = _kv(3, len(ids), dtype)
    keys[1] = keys[1].transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous input
    key = _write(hd, ids, keys, values)
    header = hd.header(key)
    assert header.num_tokens == len(ids) and header.digest == prompt_digest(ids)  # every token's KV
    with hd.open(key) as reader:
        for i in range(3):
            k, v = layer_kv(reader, i, 2, 9)
            assert k.dtype == dtype
            assert torch.equal(k, keys[i][:, 2:9].transpose(0, 1))
            assert torch.equal(v, values[i][:, 2:9].transpose(0, 1))
    with safe_open(hd.path(key), "pt") as f:  # the whole file, through safetensors' own checks
        assert sorted(f.keys()) == sorted([f"k.{i}" for i in range(3)] + [f"v.{i}" for i in range(3)])


def test_loaded_files_are_reused_then_cleared(tmp_path):
    hd = HandoffDir(tmp_path)
    big = _write(hd, list(range(40)), *_kv(2, 40))
    inode = os.stat(hd.path(big)).st_ino
    hd.release(big)
    assert not hd.path(big).exists() and len(list(tmp_path.glob("spare-*"))) == 1
    ids = list(range(7, 30))  # smaller: the spare shrinks to fit
    keys, values = _kv(2, len(ids), seed=1)
    small = _write(hd, ids, keys, values)
    assert os.stat(hd.path(small)).st_ino == inode and not list(tmp_path.glob("spare-*"))
    with hd.open(small) as reader:
        k, v = layer_kv(reader, 1, 0, len(ids))
        assert torch.equal(v, values[1].transpose(0, 1))
    assert hd.header(small).digest == prompt_digest(ids)
    written = [_write(hd, list(range(5)), *_kv(1, 5)) for _ in range(SPARES + 2)]
    for key in written:
        hd.release(key)
    hd.release(small)
    assert len(list(tmp_path.glob("spare-*"))) == SPARES  # bounded; the rest were deleted
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.tmp"))
    hd.clear_spares()
    assert not any(tmp_path.iterdir())


def test_bad_input_names_the_problem(tmp_path):
    hd = HandoffDir(tmp_path)
    with pytest.raises(ValueError, match="empty prompt"):
        _write(hd, [], *_kv(1, 0))
    with pytest.raises(RuntimeError, match="blend failed"):  # the filler's error: the file is not published
        with hd.filling(list(range(5)), 1, 3, 8, torch.float32) as (key, layers):
            raise RuntimeError("blend failed")
    assert not hd.path(key).exists()
    with pytest.raises(ValueError, match="k.0: dtype torch.int32"):
        _write(hd, list(range(5)), [torch.zeros(3, 5, 8, dtype=torch.int32)], [torch.zeros(3, 5, 8, dtype=torch.int32)])
    assert not any(tmp_path.iterdir())  # nothing half-written left behind
    with pytest.raises(ValueError, match="not a hand-off key"):
        hd.release("../../etc/passwd")
