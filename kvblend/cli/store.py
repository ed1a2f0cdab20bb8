"""`kvblend store ...`: inspect, check and trim a KV store directory (and its shared Redis tier)."""
from __future__ import annotations

import datetime
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from kvblend.cli import app
from kvblend.cli.bench import bench_app
from kvblend.cli.common import ModelOpt, ThreadsOpt, console, known_codec, make_kvblend

store_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and trim KV stores.")
app.add_typer(store_app, name="store")
out = Console()

DirArg = Annotated[str, typer.Argument(help="store directory (the disk tier)")]


def _disk(directory: str):
    """The disk tier in `directory`; a clean exit naming the problem if it is a URL, a file or absent."""
    from kvblend.store import DiskStore

    if "://" in directory:
        console.print(f"[red]error:[/red] {directory} is a URL, not a store directory: for a shared Redis tier use "
                      f"`kvblend store stats --remote {directory}`", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    path = Path(directory).expanduser()
    if path.is_file():
        console.print(f"[red]error:[/red] {directory} is a file, not a store directory", highlight=False)
        raise typer.Exit(2)
    if not path.is_dir():
        console.print(f"[red]error:[/red] {directory} is not a directory", highlight=False)
        raise typer.Exit(2)
    return DiskStore(path)


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


@store_app.command()
def verify(directory: DirArg, delete: Annotated[bool, typer.Option(help="remove bad objects and leftover temporary files")] = False):
    """Check every object (header, size, each layer's checksum) and list anything else in the store's folders:
    exit 1 if an object is bad or a file is foreign or left by a dead writer, 2 if the folder is not a store."""
    disk = _disk(directory)
    root = disk.root
    entries = disk.entries()
    strays = disk.strays()
    if not entries and not strays.store_files and strays.foreign:
        console.print(f"[red]error:[/red] {directory} is not a kvblend store: it holds no objects, and "
                      f"{len(strays.foreign)} other entries (first: {strays.foreign[0].relative_to(root)})", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    bad = [(e, why) for e in entries if (why := disk.verify(e)) is not None]
    for e, why in bad:
        out.print(f"bad {e.path.relative_to(root)} [red]{why}[/red]", soft_wrap=True, highlight=False)
        if delete:
            e.path.unlink(missing_ok=True)
    for f in strays.foreign:
        out.print(f"foreign {f.relative_to(root)} [yellow]not a kvblend object (left as it is)[/yellow]", soft_wrap=True, highlight=False)
    for f in strays.leftover:
        out.print(f"leftover {f.relative_to(root)} [yellow]temporary file of a writer that died[/yellow]", soft_wrap=True, highlight=False)
        if delete:
            f.unlink(missing_ok=True)
    if strays.writing:
        out.print(f"{len(strays.writing)} objects are being written (temporary files newer than a minute)")
    problems = []
    if bad:
        problems.append(f"{len(bad)} of {len(entries)} objects are bad" + (" (removed)" if delete else ""))
    if strays.foreign:
        problems.append(f"{len(strays.foreign)} files are foreign")
    if strays.leftover:
        problems.append(f"{len(strays.leftover)} temporary files are leftovers" + (" (removed)" if delete else ""))
    if problems:
        out.print(f"{directory}: " + "; ".join(problems), highlight=False)
        raise typer.Exit(1)
    out.print(f"{len(entries)} objects in {directory}: all sound" if entries else f"{directory}: an empty store (no objects)",
              highlight=False)


@store_app.command()
def stats(
    directory: Annotated[Optional[str], typer.Argument(help="store directory, or a redis:// URL (as --remote)")] = None,
    remote: Annotated[Optional[str], typer.Option(help=r"redis://host:port/db of a shared tier (pip install 'kvblend\[redis]')")] = None,
):
    """Objects and bytes per tier, and hit rates accumulated by the processes that used the store."""
    from kvblend.cli.common import one_sentence
    from kvblend.config import StoreConfig
    from kvblend.store.remote import RedisStore
    from kvblend.store.stats import read_totals

    if directory is not None and "://" in directory and remote is None:
        directory, remote = None, directory
    if directory is None and remote is None:
        console.print("[red]error:[/red] give a store directory and/or --remote")
        raise typer.Exit(2)
    sizes = {}
    disk = _disk(directory) if directory is not None else None
    if disk is not None:
        sizes["disk"] = disk.summary()
    if remote is not None:
        try:
            StoreConfig(remote_url=remote)
        except ValueError as exc:
            console.print(f"[red]error:[/red] {one_sentence(exc)}", highlight=False)
            raise typer.Exit(2)
        sizes["remote"] = RedisStore(remote).summary()
        if sizes["remote"].get("error"):
            console.print(f"[yellow]remote tier {remote} did not answer:[/yellow] {sizes['remote']['error']}", highlight=False)
    totals = read_totals(disk.root) if disk is not None else {}
    table = Table(title="KV store")
    for col in ("tier", "objects", "bytes", "hits", "misses", "hit rate", "corrupt", "errors", "evictions", "read GB/s"):
        table.add_column(col, justify="right")
    for tier in dict.fromkeys([*totals, *sizes]):
        t, s = totals.get(tier, {}), sizes.get(tier, {})
        looked = t.get("hits", 0) + t.get("misses", 0)
        rate = f"{t['hits'] / looked:.1%}" if looked else "-"
        gbps = f"{t['bytes_read'] / t['read_s'] / 1e9:.2f}" if t.get("read_s") else "-"
        table.add_row(tier, str(s.get("objects", "-")), _size(s.get("bytes")), str(t.get("hits", 0)), str(t.get("misses", 0)),
                      rate, str(t.get("corrupt", 0)), str(t.get("errors", 0)), str(t.get("evictions", 0)), gbps)
    out.print(table)


@store_app.command()
def gc(directory: DirArg, max_bytes: Annotated[str, typer.Option("--max-bytes", help="keep at most this much, e.g. 20GiB")]):
    """Evict least recently used objects (and leftover temporary files) down to --max-bytes."""
    from kvblend.config import parse_bytes

    limit = parse_bytes(max_bytes)
    if not isinstance(limit, int):
        raise typer.BadParameter(f"{max_bytes!r} is not a size such as 500MB or 20GiB", param_hint="--max-bytes")
    disk = _disk(directory)
    removed = disk.evict_to(limit)
    left = disk.summary()
    out.print(f"removed {len(removed)} objects ({_size(sum(e.size for e in removed))}); "
              f"{left['objects']} objects, {_size(left['bytes'])} left")


@store_app.command("ls")
def list_objects(directory: DirArg, limit: Annotated[Optional[int], typer.Option(min=1, help="most recent N")] = None):
    """List objects, most recently used first: key, tokens, layers, dtype, codec, size, last use."""
    from kvblend.store.format import CorruptObject

    disk = _disk(directory)
    entries = sorted(disk.entries(), key=lambda e: -e.atime_ns)[:limit]
    table = Table(title=f"{directory}")
    for col in ("key", "tokens", "layers", "dtype", "codec", "size", "last used"):
        table.add_column(col, justify="left" if col == "key" else "right")
    for e in entries:
        used = datetime.datetime.fromtimestamp(e.atime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        try:
            h = disk.header(e)
            table.add_row(e.key[:16], str(h.tokens), str(h.num_layers), h.dtype, h.codec, _size(e.size), used)
        except (CorruptObject, OSError) as exc:
            table.add_row(e.key[:16], "-", "-", "-", "-", _size(e.size), f"[red]bad: {exc}[/red]")
    out.print(table)


@store_app.command()
def recode(directory: DirArg, codec: Annotated[str, typer.Option("--codec", callback=known_codec, help="raw, fp8, int8 or int4")]):
    """Rewrite every object in CODEC (quantizing is lossy: recoding back to raw does not restore the values)."""
    from kvblend.store.format import CorruptObject

    disk = _disk(directory)
    target = type(disk)(directory, codec=codec)
    counts = {"recoded": 0, "already": 0, "damaged": 0}
    for e in disk.entries():
        lazy = disk.get(e.key)
        if lazy is not None and lazy.header.codec == codec:
            counts["already"] += 1
            continue
        try:
            kv = lazy.materialize() if lazy is not None else None
        except CorruptObject:
            kv = None
        if kv is None:
            counts["damaged"] += 1
            continue
        target.put(e.key, kv)
        counts["recoded"] += 1
    out.print(f"recoded {counts['recoded']} objects to {codec}; {counts['already']} already were; "
              f"{counts['damaged']} damaged ones left as they are (see `kvblend store verify`)")


@bench_app.command("store")
def bench_store_command(
    scratch: Annotated[Path, typer.Option(help="scratch directory on the disk to measure (emptied)")] = Path("/tmp/kvblend-bench-store"),
    total_bytes: Annotated[str, typer.Option(help="bytes read per bandwidth measurement")] = "256MiB",
    context_tokens: Annotated[int, typer.Option(min=64, help="prompt size of the TTFT comparison")] = 4096,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    ttft: Annotated[bool, typer.Option(help="also compare blend TTFT with chunks on disk vs in memory")] = True,
    datasets: Annotated[Optional[Path], typer.Option(file_okay=False, help=(
        "folder with a musique_dev.json to cut contexts from (default: the MuSiQue records shipped with kvblend)"))] = None,
    model: ModelOpt = "smollm2-135m",
    threads: ThreadsOpt = None,
):
    """Tier read bandwidth vs dd / memcpy, and blend TTFT with chunks on disk vs in CPU memory."""
    from kvblend.config import parse_bytes
    from kvblend.eval.bench_store import bench_store

    size = parse_bytes(total_bytes)
    if not isinstance(size, int):
        raise typer.BadParameter(f"{total_bytes!r} is not a size such as 256MiB", param_hint="--total-bytes")
    with make_kvblend(model, None, "cpu", "float32", threads=threads) if ttft else nullcontext() as kb, console.status("measuring"):
        rows, ttft_rows = bench_store(scratch, kb, size, context_tokens, repeats, datasets)
    table = Table(title=f"read bandwidth, one thread (medians of {repeats} rounds; share: of the per-round ratios)")
    for col in ("tier", "GB/s", "reference", "GB/s", "share"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.what, f"{r.gbps:.2f}", r.reference, f"{r.reference_gbps:.2f}", f"{r.share:.0%}")
    out.print(table)
    if ttft_rows:
        table = Table(title=f"blend TTFT, {context_tokens} tokens, {model}")
        for col in ("chunks", "TTFT median (s)", "vs cpu-resident"):
            table.add_column(col, justify="right")
        for r in ttft_rows:
            table.add_row(r.condition, f"{r.ttft_median_s:.3f}", f"{r.vs_cpu:.2f}x")
        out.print(table)
