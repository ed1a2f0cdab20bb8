"""Store benchmark: tier read bandwidth against plain reads of the same bytes, and blend TTFT with
chunks resident on disk vs in CPU memory, with and without layer-wise pipelining.

Both sides of a bandwidth comparison move the same bytes in the same number of reads or copies, on
one thread, alternating within every round (the machine's speed drifts); the share is the median of
the per-round ratios.
- disk tier vs `dd` of the same object files in the tier's read size, timed by dd itself (its
  process start-up is not counted against it), cold (pages dropped with posix_fadvise DONTNEED)
  and warm. The tier's figure includes checksum verification and landing the bytes in the chunk's
  tensors, where dd reuses one buffer that stays in the CPU cache: a third row splits that gap,
  against the tier's own reads into a buffer per object without any check.
- CPU tier vs torch copy_: fetching every layer of every object into a destination buffer (what the
  executor does with a cached layer) against copy_ of the same pieces into the same buffer.
- TTFT: one model, conditions interleaved per repeat; disk-resident runs use a disk-only store
  (no promotion) with its pages dropped before every request.
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from kvblend.config import StoreConfig
from kvblend.scratch import owner_only_dir
from kvblend.store import ChunkKV, DiskStore, MemoryStore, open_store
from kvblend.store.disk import READ_PIECE
from kvblend.store.format import HEAD_READ

# SmolLM2-135M's cache shape: 30 layers, 3 KV heads, head_dim 64 (fp32: 46 KiB per token)
MODEL_SHAPE = (30, 3, 64)


@dataclass
class BandwidthRow:
    what: str
    gbps: float  # median over rounds
    reference: str
    reference_gbps: float
    share: float  # median over rounds of tier / reference, each pair measured side by side


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


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dd_seconds(path: Path, block: int) -> float:
    """dd's own timing of a sequential read of `path` in `block`-byte reads."""
    done = subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={block}"], check=True, capture_output=True,
                          text=True, env={**os.environ, "LC_ALL": "C"})
    found = re.search(r"copied, ([0-9.e+-]+) s", done.stderr)
    if found is None:
        raise RuntimeError(f"no timing in dd's report: {done.stderr.strip()!r}")
    return float(found.group(1))


def compare(what: str, tier: Callable[[], float], reference: str, plain: Callable[[], float], nbytes: int,
            repeats: int) -> BandwidthRow:
    """Time tier and plain (each returns its seconds) side by side, alternating which goes first.

    A first round is dropped: it warms both paths (and pages re-read for the first time cost more).
    """
    tier(), plain()
    pairs = []
    for i in range(repeats):
        first, second = (tier, plain) if i % 2 == 0 else (plain, tier)
        a, b = first(), second()
        pairs.append((a, b) if i % 2 == 0 else (b, a))
    return BandwidthRow(what, nbytes / statistics.median(t for t, _ in pairs) / 1e9, reference,
                        nbytes / statistics.median(p for _, p in pairs) / 1e9, statistics.median(p / t for t, p in pairs))


def bandwidth(directory: Path, total_bytes: int = 256 * 2**20, repeats: int = 3) -> list[BandwidthRow]:
    """Disk tier vs dd (cold, warm) and CPU tier vs copy_, one round of each pair per repeat.

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
    try:
        return [*_disk_rows(DiskStore(directory / "tier"), chunks, repeats), _memory_row(chunks, repeats)]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _disk_rows(disk: DiskStore, chunks: list[ChunkKV], repeats: int) -> list[BandwidthRow]:
    for kv in chunks:
        disk.put(kv.key, kv)
    files = [disk.path(kv.key) for kv in chunks]
    nbytes = sum(f.stat().st_size for f in files)
    header = disk.get(chunks[0].key).header  # every object has the same shape
    layers_nbytes = header.num_layers * header.layer_nbytes

    def read_tier(cold: bool) -> float:
        if cold:
            drop_cache(files)
        t0 = time.perf_counter()
        for kv in chunks:
            lazy = disk.get(kv.key)
            lazy.load_through(lazy.num_layers - 1)
            if lazy.failed:
                raise RuntimeError(f"object {kv.key} failed to load")
        return time.perf_counter() - t0

    def read_dd(cold: bool) -> float:
        if cold:
            drop_cache(files)
        return sum(dd_seconds(f, READ_PIECE) for f in files)

    def read_plain() -> float:
        """The tier's reads (header, then each layer's pieces into one buffer per object) without any check."""
        t0 = time.perf_counter()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.pread(fd, HEAD_READ, 0)
            out = memoryview(torch.empty(layers_nbytes, dtype=torch.uint8).numpy())
            for start in range(0, layers_nbytes, READ_PIECE):
                os.preadv(fd, [out[start : start + READ_PIECE]], header.data_offset + start)
            os.close(fd)
            del out  # one buffer alive at a time, as in read_tier
        return time.perf_counter() - t0

    rows = [compare(f"disk tier, {state}", partial(read_tier, cold), f"dd, {state}", partial(read_dd, cold), nbytes, repeats)
            for state, cold in (("cold", True), ("warm", False))]
    rows.append(compare("disk tier, warm", partial(read_tier, False), "preadv into memory, warm", read_plain, nbytes, repeats))
    return rows


def _memory_row(chunks: list[ChunkKV], repeats: int) -> BandwidthRow:
    memory = MemoryStore()
    for kv in chunks:
        memory.put(kv.key, kv)
    dest = torch.empty(chunks[0].layer_shape)
    pieces = [t for kv in chunks for i in range(kv.num_layers) for t in kv.layer(i)]

    def read_memory() -> None:
        for kv in chunks:
            got = memory.get(kv.key)
            for i in range(got.num_layers):
                k, v = got.layer(i)
                dest.copy_(k)
                dest.copy_(v)

    def copy_pieces() -> None:
        for piece in pieces:
            dest.copy_(piece)

    return compare("cpu tier", partial(_timed, read_memory), "torch copy_", partial(_timed, copy_pieces),
                   sum(p.nbytes for p in pieces), repeats)


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
    """Bandwidth rows, and TTFT rows when a KVBlend is given (scratch files go under `directory`, owner-only)."""
    directory = owner_only_dir(directory)
    rows = bandwidth(Path(directory) / "bandwidth", total_bytes, repeats)
    ttft_rows = ttft(kb, Path(directory) / "ttft", context_tokens, repeats=repeats, datasets=datasets) if kb is not None else []
    return rows, ttft_rows
