"""Throughput under load: RAG requests sent to a `kvblend serve` endpoint with a fixed concurrency.

Each request is a dataset record (its question, its passages in a shuffled order) as a streamed
chat completion with a `kvblend` field naming the prefill method. Per concurrency level the run
reports requests per second over the level's wall time and TTFT percentiles (time to the first
streamed token, from the moment the request is sent; vLLM's `return_token_ids` marks it even when
its text is empty). One request is sent first, alone and not counted, so that start-up work (a
compile, a first store read) stays out of the figures. Each level sends records of its own (the
levels take consecutive slices after the warm-up record): a prompt repeated from an earlier level
would be served from the prefix cache that level filled.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass

from kvblend.eval.datasets import Record


@dataclass
class LoadRow:
    label: str  # what the server and method were (e.g. "blend", "prefix")
    concurrency: int
    requests: int
    failed: int
    wall_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def request_body(record: Record, index: int, model: str, method: str, max_tokens: int, shuffle_seed: int | None) -> dict:
    """The chat body for a record: its passages shuffled per record (seed + index), greedy decoding."""
    chunks = record.chunks_in_order(index, shuffle_seed)
    return {"model": model, "messages": [{"role": "user", "content": record.question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "return_token_ids": True, "kvblend": {"chunks": chunks, "method": method}}


async def _one(client, url: str, body: dict) -> tuple[float, float]:
    """(TTFT, latency) of one streamed request; raises on an HTTP error or a stream with no token."""
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]  # a usage-only chunk has none
                if choices[0].get("token_ids") or choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return first, time.perf_counter() - t0


async def _level(client, url: str, bodies: list[dict], concurrency: int) -> tuple[list[tuple[float, float]], int, float]:
    gate = asyncio.Semaphore(concurrency)
    failed = 0

    async def send(body):
        nonlocal failed
        async with gate:
            try:
                return await _one(client, url, body)
            except Exception:  # counted; the level goes on
                failed += 1
                return None

    t0 = time.perf_counter()
    results = await asyncio.gather(*(send(b) for b in bodies))
    return [r for r in results if r is not None], failed, time.perf_counter() - t0


async def _run(base_url: str, warm_up: dict, levels: list[tuple[int, list[dict]]], label: str, timeout_s: float) -> list[LoadRow]:
    try:
        import httpx
    except ImportError as exc:
        raise ImportError("kvblend bench load needs httpx (pip install httpx; vLLM installs it)") from exc
    url = base_url.rstrip("/") + "/chat/completions"
    rows = []
    limits = httpx.Limits(max_connections=max(c for c, _ in levels) + 1)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await _one(client, url, warm_up)  # not counted
        for c, bodies in levels:
            done, failed, wall = await _level(client, url, bodies, c)
            ttfts, latencies = [d[0] for d in done], [d[1] for d in done]
            rows.append(LoadRow(label, c, len(bodies), failed, wall, len(done) / wall, percentile(ttfts, 0.5),
                                percentile(ttfts, 0.99), percentile(latencies, 0.5)))
    return rows


def records_needed(per_level: int, levels: int) -> int:
    """Records a run takes: one warm-up, then `per_level` of its own for each level."""
    return 1 + per_level * levels


def run_load(base_url: str, records: list[Record], model: str, method: str, concurrencies: list[int], per_level: int,
             label: str | None = None, max_tokens: int = 16, shuffle_seed: int | None = 0,
             timeout_s: float = 600.0) -> list[LoadRow]:
    """Warm up with the first record, then send `per_level` records of their own at each
    concurrency level in turn; one LoadRow per level."""
    if not concurrencies or min(concurrencies) < 1:
        raise ValueError(f"concurrency levels must be >= 1, got {concurrencies}")
    if per_level < 1:
        raise ValueError(f"records per level must be >= 1, got {per_level}")
    needed = records_needed(per_level, len(concurrencies))
    if len(records) < needed:
        raise ValueError(f"{len(concurrencies)} levels of {per_level} records and a warm-up need {needed} records; "
                         f"the dataset has {len(records)}")
    bodies = [request_body(r, i, model, method, max_tokens, shuffle_seed) for i, r in enumerate(records[:needed])]
    levels = [(c, bodies[1 + i * per_level : 1 + (i + 1) * per_level]) for i, c in enumerate(concurrencies)]
    return asyncio.run(_run(base_url, bodies[0], levels, label or method, timeout_s))
