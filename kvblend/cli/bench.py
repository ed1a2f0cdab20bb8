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

    with make_kvblend(model, None, device, dtype, threads=threads) as kb:
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
