"""Store benchmark: tier read bandwidth against plain reads of the same bytes, and blend TTFT with
chunks resident on disk vs in CPU memory, with and without layer-wise pipelining.

- disk tier vs `dd` of a file of the same size, cold (pages dropped with posix_fadvise DONTNEED)
  and warm; the tier's figure includes checksum verification and landing the bytes in tensors.
- CPU tier vs torch memcpy: fetching every layer of every object into a destination buffer (what
  the executor does with a cached layer) against one `copy_` of the same bytes.
- TTFT: one model, conditions interleaved per repeat (the machine's speed drifts); disk-resident
  runs use a disk-only store (no promotion) with its pages dropped before every request.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvblend.config import StoreConfig
from kvblend.store import ChunkKV, DiskStore, MemoryStore, open_store

# SmolLM2-135M's cache shape: 30 layers, 3 KV heads, head_dim 64 (fp32: 46 KiB per token)
MODEL_SHAPE = (30, 3, 64)


@dataclass
class BandwidthRow:
    what: str
    gbps: float
    reference: str
    reference_gbps: float

    @property
    def share(self) -> float:
        return self.gbps / self.reference_gbps


@dataclass
class TTFTRow:
    condition: str
    ttft_median_s: float
    vs_cpu: float  # median over repeats of TTFT / CPU-resident TTFT


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache, so the next read comes from the device."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def synthetic_chunks(total_bytes: int, tokens: int = 512, shape: tuple[int, int, int] = MODEL_SHAPE) -> list[ChunkKV]:
    layers, heads, dim = shape
    per_chunk = 2 * layers * heads * tokens * dim * 4
    out = []
    for i in range(max(1, total_bytes // per_chunk)):
        g = torch.Generator().manual_seed(i)
        kv = torch.randn((2, layers, heads, tokens, dim), generator=g)
        out.append(ChunkKV(f"{i:064x}", "bench", kv[0], kv[1]))
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _dd(path: Path) -> None:
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)


def bandwidth(directory: Path, total_bytes: int = 256 * 2**20, repeats: int = 3) -> list[BandwidthRow]:
    """Disk tier vs dd (cold, warm) and CPU tier vs memcpy; best of `repeats` for each.

    Runs with one torch thread: on a shared machine, small multi-threaded copies measure the
    thread pool's wake-ups, not the memory.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bandwidth(Path(directory), total_bytes, repeats)
    finally:
        torch.set_num_threads(threads)


def _bandwidth(directory: Path, total_bytes: int, repeats: int) -> list[BandwidthRow]:
    shutil.rmtree(directory, ignore_errors=True)
    chunks = synthetic_chunks(total_bytes)
    disk = DiskStore(directory / "tier")
    for kv in chunks:
        disk.put(kv.key, kv)
    files = [disk.path(kv.key) for kv in chunks]
    nbytes = sum(f.stat().st_size for f in files)
    plain = directory / "plain.bin"
    with open(plain, "wb") as f:
        for path in files:
            f.write(path.read_bytes())

    def read_tier() -> None:
        for kv in chunks:
            lazy = disk.get(kv.key)
            lazy.load_through(lazy.num_layers - 1)
            assert not lazy.failed

    def best(fn, cold: list[Path] | None) -> float:
        times = []
        for _ in range(repeats):
            if cold:
                drop_cache(cold)
            times.append(_timed(fn))
        return nbytes / min(times) / 1e9

    rows = [
        BandwidthRow("disk tier, cold", best(read_tier, files), "dd, cold", best(lambda: _dd(plain), [plain])),
        BandwidthRow("disk tier, warm", best(read_tier, None), "dd, warm", best(lambda: _dd(plain), None)),
    ]
    memory = MemoryStore()
    for kv in chunks:
        memory.put(kv.key, kv)
    dest = torch.empty(MODEL_SHAPE[1:2] + (512, MODEL_SHAPE[2]))
    src_flat = torch.cat([torch.stack([kv.keys, kv.values]).reshape(-1) for kv in chunks])
    dst_flat = torch.empty_like(src_flat)

    def read_memory() -> None:
        for kv in chunks:
            got = memory.get(kv.key)
            for i in range(got.num_layers):
                k, v = got.layer(i)
                dest.copy_(k)
                dest.copy_(v)

    mem_bytes = src_flat.nbytes
    tier = mem_bytes / min(_timed(read_memory) for _ in range(repeats)) / 1e9
    copy = mem_bytes / min(_timed(lambda: dst_flat.copy_(src_flat)) for _ in range(repeats)) / 1e9
    rows.append(BandwidthRow("cpu tier", tier, "torch memcpy", copy))
    shutil.rmtree(directory, ignore_errors=True)
    return rows


def ttft(kb, directory: Path, context_tokens: int = 4096, chunk_tokens: int = 512, repeats: int = 3,
         datasets: Path | None = None) -> list[TTFTRow]:
    """Blend TTFT with chunks in CPU memory vs on disk (cold pages), pipelined and not."""
    from kvblend.eval.bench import QUESTION, corpus_text, make_chunks

    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    chunks = make_chunks(kb, corpus_text(datasets), context_tokens, chunk_tokens)
    original_store, depth = kb.store, kb.config.store.prefetch_layers
    cpu_store = open_store(StoreConfig(cpu_bytes=2**34))
    disk_store = open_store(StoreConfig(cpu_bytes=0, disk_dir=str(directory)))
    try:
        for store in (cpu_store, disk_store):
            kb.store = store
            kb.precompute(chunks)
            store.flush()
        files = [e.path for e in disk_store.serialized[0].entries()]
        conditions = {
            "cpu-resident": (cpu_store, depth, False),
            "disk-resident, pipelined": (disk_store, max(depth, 1), True),
            "disk-resident, not pipelined": (disk_store, 0, True),
            "disk-resident (warm pages), pipelined": (disk_store, max(depth, 1), False),
        }
        times: dict[str, list[float]] = {name: [] for name in conditions}
        for rep in range(repeats + 1):  # the first round warms up and is dropped
            for name, (store, prefetch, cold) in conditions.items():
                kb.store, kb.config.store.prefetch_layers = store, prefetch
                if cold:
                    drop_cache(files)
                pre = kb.prefill(chunks, QUESTION, "blend")
                if pre.stats.chunk_misses:
                    raise RuntimeError(f"{name}: {pre.stats.chunk_misses} chunks missed the store")
                if rep:
                    times[name].append(pre.stats.ttft_s)
    finally:
        kb.store, kb.config.store.prefetch_layers = original_store, depth
        disk_store.close()
        shutil.rmtree(directory, ignore_errors=True)
    cpu = times["cpu-resident"]
    return [TTFTRow(name, statistics.median(ts), statistics.median(t / c for t, c in zip(ts, cpu))) for name, ts in times.items()]


def bench_store(directory: Path, kb=None, total_bytes: int = 256 * 2**20, context_tokens: int = 4096,
                repeats: int = 3, datasets: Path | None = None) -> tuple[list[BandwidthRow], list[TTFTRow]]:
    """Bandwidth rows, and TTFT rows when a KVBlend is given (scratch files go under `directory`)."""
    rows = bandwidth(Path(directory) / "bandwidth", total_bytes, repeats)
    ttft_rows = ttft(kb, Path(directory) / "ttft", context_tokens, repeats=repeats, datasets=datasets) if kb is not None else []
    return rows, ttft_rows
