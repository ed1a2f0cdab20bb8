"""The cost lines of `kvblend precompute --dry-run`: store size per codec, and time at a speed measured here."""
from __future__ import annotations

from rich.filesize import decimal

from kvblend.cli.common import console, make_kvblend
from kvblend.config import StoreConfig
from kvblend.corpus.estimate import Estimate, format_estimate, measure_tokens_per_s, sample, store_bytes
from kvblend.corpus.precompute import PlannedChunk


def print_estimate(config, planned: list[PlannedChunk], codec: str, model: str, device: str, dtype: str,
                   threads: int | None, workers: int, encoding: dict) -> None:
    """Load the model, encode a sample of the corpus's chunks into memory (nothing is stored) and print
    the estimate; `workers` divides the time (Ray actors, each encoding at the measured speed). The
    sample is encoded as the real run will (`encoding`: chunk context and primer), primer tokens included."""
    chunks = sample(planned)
    with make_kvblend(model, StoreConfig(cpu_bytes=2**32, codec="raw"), device, dtype, threads=threads, **encoding) as kb:
        with console.status(f"measuring encoding speed on {sum(p.tokens for p in chunks[1:]):,} tokens"):
            speed = measure_tokens_per_s(kb.precompute, chunks)
    total = sum(p.tokens for p in planned)
    est = Estimate(total, store_bytes(config, dtype, total), speed, workers)
    for line in format_estimate(est, codec, decimal):
        console.print(line, highlight=False)
