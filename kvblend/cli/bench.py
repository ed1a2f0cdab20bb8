"""`kvblend bench`: TTFT of full prefill vs full reuse vs blend, beside the compute bound."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress
from rich.table import Table

from kvblend.cli import app
from kvblend.cli.common import DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, console, make_kvblend

bench_app = typer.Typer(help="Benchmarks (TTFT by default; see subcommands).", invoke_without_command=True)
app.add_typer(bench_app, name="bench")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@bench_app.callback()
def bench_ttft_command(
    ctx: typer.Context,
    context_tokens: Annotated[str, typer.Option(help="comma list of prompt sizes")] = "1024,2048,4096",
    chunk_tokens: Annotated[int, typer.Option(min=1)] = 512,
    ratios: Annotated[str, typer.Option(help="comma list of recompute ratios")] = "0.05,0.15,0.3",
    selection: Annotated[Optional[str], typer.Option(help=(
        "the blend's ranking: lookahead (default), deviation (CacheBlend's), query or random"))] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    datasets: Annotated[Optional[Path], typer.Option(file_okay=False, help=(
        "folder with a musique_dev.json to cut contexts from (default: the MuSiQue records shipped with kvblend)"))] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="PNG of speed-up vs ratio")] = None,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
):
    """TTFT of full vs reuse vs blend per context size and ratio."""
    if ctx.invoked_subcommand is not None:
        return
    from kvblend.eval.bench import bench_ttft, plot

    with make_kvblend(model, None, device, dtype, threads=threads, selection=selection) as kb:
        sizes, rs = _ints(context_tokens), _floats(ratios)
        with Progress(console=console) as progress:
            task = progress.add_task("bench", total=len(sizes) * (repeats + 1) * (2 + len(rs)))
            try:
                rows = bench_ttft(kb, sizes, chunk_tokens, rs, repeats, datasets, on_step=lambda: progress.advance(task))
            except ValueError as exc:
                console.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(2)
        table = Table(title=f"TTFT, {kb.config.model}, {dtype}, {device}")
        for col in ("tokens", "method", "r", "TTFT med (s)", "speed-up", "bound", "of bound"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(str(r.context_tokens), r.method, "-" if r.ratio is None else f"{r.ratio:.2f}", f"{r.ttft_median_s:.3f}",
                          f"{r.speedup:.2f}x", "-" if r.bound is None else f"{r.bound:.2f}x",
                          "-" if r.bound is None else f"{r.speedup / r.bound:.0%}")
        console.print(table)
        if json_out:
            json_out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "config": kb.config.model_dump()}, indent=2))
        if plot_out:
            plot(rows, plot_out)


@bench_app.command("load")
def bench_load_command(
    url: Annotated[str, typer.Argument(help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")],
    dataset: Annotated[str, typer.Option(help="a bundled dataset's name or a file (musique-dev, cacheblend, ...)")] = "musique-dev",
    limit: Annotated[int, typer.Option(min=1, help="records sent at each concurrency level (each level its own)")] = 16,
    top_k: Annotated[int, typer.Option(min=1, help="passages per record")] = 6,
    shuffle_seed: Annotated[int, typer.Option(help="passages are sent in a shuffled order per record")] = 0,
    method: Annotated[str, typer.Option(help="kvblend.method of every request: blend, reuse or full")] = "blend",
    label: Annotated[Optional[str], typer.Option(help="the rows' name (default: the method), e.g. prefix")] = None,
    concurrency: Annotated[str, typer.Option(help="comma list of requests in flight at once")] = "1,4,8",
    max_tokens: Annotated[int, typer.Option(min=1)] = 16,
    served_model: Annotated[str, typer.Option("--served-model", help="the server's model name")] = "smollm2-135m",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="add the rows to this JSON list (created if missing)")] = None,
):
    """Requests/s and TTFT p50/p99 of a `kvblend serve` endpoint at each concurrency level."""
    from kvblend.eval.datasets import load_dataset
    from kvblend.eval.load import records_needed, run_load
    from kvblend.results import PREFILL_METHODS

    if method not in PREFILL_METHODS:
        raise typer.BadParameter(f"{method!r}: choose one of {', '.join(PREFILL_METHODS)}", param_hint="--method")
    try:
        levels = _ints(concurrency)
        records = load_dataset(dataset, top_k=top_k, limit=records_needed(limit, len(levels)))
        rows = run_load(url, records, served_model, method, levels, limit, label, max_tokens, shuffle_seed)
    except (ValueError, OSError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    table = Table(title=f"load on {url}")
    for col in ("label", "concurrency", "requests", "failed", "req/s", "TTFT p50 (s)", "TTFT p99 (s)", "latency p50 (s)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.label, str(r.concurrency), str(r.requests), str(r.failed), f"{r.requests_per_s:.3f}",
                      f"{r.ttft_p50_s:.3f}", f"{r.ttft_p99_s:.3f}", f"{r.latency_p50_s:.3f}")
    console.print(table)
    if json_out:
        previous = json.loads(json_out.read_text()) if json_out.exists() else []
        json_out.write_text(json.dumps(previous + [r.as_dict() for r in rows], indent=2))
