"""`kvblend generate`: answer a question over the chunks of a JSON file, streaming the answer."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kvblend.cli import app
from kvblend.cli.common import CodecOpt, DeviceOpt, DtypeOpt, EngineOpt, ModelOpt, RatioOpt, StoreOpt, ThreadsOpt, console, make_kvblend, stats_line
from kvblend.eval.datasets import load_chunks_file


@app.command()
def generate(
    chunks_file: Annotated[Path, typer.Option("--chunks-file", exists=True, dir_okay=False, help="JSON: a list of chunk texts, or a CacheBlend prompt file")],
    question: Annotated[Optional[str], typer.Option("--question", "-q", help="the question (default: the file's 'query')")] = None,
    method: Annotated[str, typer.Option(help="blend, full or reuse")] = "blend",
    recompute_ratio: RatioOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    precompute: Annotated[bool, typer.Option(help="encode chunks missing from the store first (not timed)")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the answer and stats here")] = None,
    model: ModelOpt = "smollm2-135m",
    store: StoreOpt = None,
    codec: CodecOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    engine: EngineOpt = "hf",
    threads: ThreadsOpt = None,
):
    """Answer QUESTION over the chunks in CHUNKS_FILE with blending (or a baseline)."""
    try:
        record = load_chunks_file(chunks_file)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    question = question or record.question
    if not question:
        console.print("[red]error:[/red] no --question given and the file has no 'query'")
        raise typer.Exit(2)
    with make_kvblend(model, store, device, dtype, engine, threads, codec, recompute_ratio=recompute_ratio) as kb:
        if precompute:
            with console.status("precomputing chunk caches"):
                kb.precompute(record.chunks)
        try:
            result = kb.generate(record.chunks, question, max_new_tokens=max_new_tokens, method=method,
                                 on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
        print()
        s = result.stats
        console.print(stats_line(method, s))
        if json_out:
            json_out.write_text(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": s.as_dict()}, indent=2))
