"""`kvblend demo`: the bundled sample end to end — precompute, blend, answer, compare with full."""
from __future__ import annotations

import json
import sys
from importlib import resources
from typing import Optional

import typer

from kvblend.cli import app
from kvblend.cli.common import CodecOpt, DeviceOpt, DtypeOpt, ModelOpt, RatioOpt, ThreadsOpt, console, make_kvblend
from kvblend.config import kvblend_home


@app.command()
def demo(
    recompute_ratio: RatioOpt = None,
    max_new_tokens: int = typer.Option(24, min=1),
    store: Optional[str] = typer.Option(None, help="store directory (default: $KVBLEND_HOME/stores/demo)"),
    codec: CodecOpt = None,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
):
    """Answer CacheBlend's example 1 with blending and show TTFT blend vs full prefill."""
    sample = json.loads(resources.files("kvblend").joinpath("data/sample.json").read_text())
    chunks, question = [sample[str(i)] for i in range(sample["chunk_num"])], sample["query"]
    store = store or str(kvblend_home() / "stores" / "demo")
    with make_kvblend(model, store, device, dtype, threads=threads, codec=codec, recompute_ratio=recompute_ratio) as kb:
        with console.status(f"precomputing {len(chunks)} chunks into {store}"):
            kb.precompute(chunks)
            for method in ("full", "blend"):  # warm-up: first calls pay one-off allocation costs
                kb.prefill(chunks, question, method)
        console.print(f"[bold]Question:[/bold] {question.strip()}")
        results = {}
        for method in ("blend", "full"):
            console.print(f"[bold]{method}:[/bold] ", end="")
            results[method] = kb.generate(chunks, question, max_new_tokens=max_new_tokens, method=method,
                                          on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            print()
        b, f = results["blend"].stats, results["full"].stats
        console.print(
            f"TTFT blend {b.ttft_s:.2f}s vs full prefill {f.ttft_s:.2f}s: {f.ttft_s / b.ttft_s:.1f}x faster "
            f"({b.tokens_total} prompt tokens, {b.chunk_hits}/{b.chunk_hits + b.chunk_misses} chunks from the store, "
            f"{b.tokens_recomputed} of {b.tokens_cached} cached tokens recomputed)"
        )
