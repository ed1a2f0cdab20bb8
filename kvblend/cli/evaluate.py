"""`kvblend eval`: quality and TTFT of full / reuse / blend (and blend variants) on a dataset."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress
from rich.markup import escape
from rich.table import Table

from kvblend.cli import app
from kvblend.cli.common import ChunkContextOpt, CodecOpt, DeviceOpt, DtypeOpt, EngineOpt, ModelOpt, RatioOpt, StoreOpt, ThreadsOpt, console, make_kvblend


def _dataset_primer(path: Path, top_k: int | None, model: str) -> str:
    """The primer precompute would choose with the dataset as the corpus: every record's passages."""
    from transformers import AutoTokenizer

    from kvblend.corpus.primer import choose_primer
    from kvblend.eval.datasets import load_dataset
    from kvblend.models.registry import resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    except (ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    passages = [chunk for record in load_dataset(path, top_k=top_k) for chunk in record.chunks]
    return choose_primer(passages, tokenizer)


@app.command("eval")
def eval_command(
    dataset: Annotated[str, typer.Argument(help=(
        "a bundled dataset (musique-dev, cacheblend, cacheblend-1 ... cacheblend-10) or a path: "
        "CacheBlend prompt file/folder or MuSiQue-style JSON list"), show_default=False)],
    methods: Annotated[str, typer.Option(help=r"comma list: full, reuse, blend, blend\[key=value,...], prefix (vllm engine)")] = "full,reuse,blend",
    limit: Annotated[Optional[int], typer.Option(min=1, help="first N records")] = None,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="keep each record's first K contexts, in order")] = None,
    shuffle_seed: Annotated[Optional[int], typer.Option(help="ask each record's chunks in a seeded shuffled order (precomputed in dataset order)")] = None,
    recompute_ratio: RatioOpt = None,
    chunk_context: ChunkContextOpt = None,
    primer_file: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help=(
        "text file: the passage (stripped) primed chunks are encoded after; implies --chunk-context primed"))] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results here")] = None,
    frontier: Annotated[bool, typer.Option("--frontier", help=(
        "sweep blend over --ratios beside full, reuse (and prefix on vllm), plus any --methods variants, and plot it"))] = False,
    ratios: Annotated[str, typer.Option(help="recompute ratios the frontier sweeps")] = "0.05,0.08,0.1,0.15,0.2,0.3,0.5",
    plot: Annotated[Path, typer.Option(help="where --frontier writes its PNG")] = Path("frontier.png"),
    model: ModelOpt = "smollm2-135m",
    store: StoreOpt = None,
    codec: CodecOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    engine: EngineOpt = "hf",
    threads: ThreadsOpt = None,
):
    """Compare methods against full prefill: F1, agreement, KL, TTFT and speed-up."""
    from kvblend.config import BlendConfig
    from kvblend.eval.datasets import load_dataset, resolve_dataset
    from kvblend.eval.frontier import frontier_methods, parse_ratios, plot_frontier
    from kvblend.eval.methods import parse_methods
    from kvblend.eval.runner import EvalReport, evaluate

    try:
        path = resolve_dataset(dataset)
        records = load_dataset(path, top_k=top_k, limit=limit)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    blend = {"chunk_context": chunk_context} if chunk_context else {}
    if primer_file:
        blend["primer"] = primer_file.read_text(encoding="utf-8").strip()
        blend.setdefault("chunk_context", "primed")
    elif blend.get("chunk_context", BlendConfig().chunk_context) == "primed":
        blend["primer"] = _dataset_primer(path, top_k, model)
    with make_kvblend(model, store, device, dtype, engine, threads, codec, recompute_ratio=recompute_ratio, **blend) as kb:
        try:
            if frontier:
                methods = frontier_methods(parse_ratios(ratios), methods, with_prefix="prefix" in kb.engine.methods)
            specs = parse_methods(methods, kb.config.blend)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--ratios" if "--ratios" in str(exc) else "--methods")
        def write_json(report: EvalReport, summary: dict | None) -> None:
            """The results so far (summary None: a partial run, records only), so a long eval loses nothing."""
            config = {"dataset": str(dataset), "limit": limit, "top_k": top_k, "shuffle_seed": shuffle_seed, "engine": engine,
                      "max_new_tokens": max_new_tokens, "kvblend": kb.config.model_dump(), "threads": threads}
            per_record = {name: [vars(r) for r in rows] for name, rows in report.methods.items()}
            tmp = json_out.with_name(json_out.name + ".partial")
            tmp.write_text(json.dumps({"methods": summary, "config": config, "records": per_record}, indent=2))
            tmp.replace(json_out)

        def after_record(index: int, report: EvalReport) -> None:
            progress.advance(task)
            if json_out and index + 1 < len(records):
                write_json(report, None)

        with Progress(console=console) as progress:
            task = progress.add_task(f"eval {len(records)} records x {len(specs)} methods", total=len(records))
            try:
                report = evaluate(kb, records, specs, max_new_tokens, on_record=after_record, shuffle_seed=shuffle_seed)
            except ValueError as exc:  # a record the model cannot take (too long for its context, an empty chunk)
                console.print(f"[red]error:[/red] {escape(str(exc))}")
                raise typer.Exit(2)
        summary = report.summary()
        table = Table(title=f"{escape(dataset)}: {len(records)} records, top-k {top_k or 'all'}")
        for col in ("method", "F1", "1st-tok agree", "tok agree", "KL first", "KL tf16", "TTFT med (s)", "speed-up"):
            table.add_column(col, justify="right")
        def with_ci(s: dict, key: str, digits: int) -> str:
            lo, hi = s[f"{key}_ci"]
            return f"{s[key]:.{digits}f} ±{(hi - lo) / 2:.{digits}f}" if lo == lo else f"{s[key]:.{digits}f}"

        def timing(s: dict) -> tuple[str, str]:  # an oracle is not timed
            untimed = s["ttft_median_s"] != s["ttft_median_s"]
            return ("-", "-") if untimed else (f"{s['ttft_median_s']:.3f}", f"{s['speedup_vs_full']:.2f}x")

        for name, s in summary.items():
            f1 = "-" if s["f1"] is None else with_ci(s, "f1", 3)
            table.add_row(escape(name), f1, with_ci(s, "first_token_agree", 2), f"{s['token_agree']:.2f}", f"{s['kl_first']:.3f}",
                          with_ci(s, "kl_tf", 3), *timing(s))
        console.print(table)
        console.print("[dim]±: half the 95% bootstrap interval of the mean over records (bounds in --json)[/dim]")
        if frontier:
            plot_frontier(summary, specs, plot, f"{dataset}: {len(records)} records, {kb.config.model}")
            console.print(f"frontier plot: {plot}")
        if json_out:
            write_json(report, summary)
