"""Options shared by commands, and building a KVBlend from them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from kvblend.config import StoreConfig

console = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", help="model alias (smollm2-135m) or local HF folder")]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help=(
    "KV store directory or redis:// URL (default: in memory; with --engine vllm, a temporary folder)"))]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16")]
EngineOpt = Annotated[str, typer.Option("--engine", help=(
    r"decoding engine: hf (transformers) or vllm (blending in vLLM's worker on its weights; "
    r"pip install 'kvblend\[vllm]')"))]  # \[: literal, not rich markup


def recompute_ratio(value: str | None) -> float | str | None:
    """--recompute-ratio: a share in [0, 1], or "auto" (chosen per request from tier bandwidth and
    prefill speed); unset, the blend config's default."""
    if value is None or value == "auto":
        return value
    try:
        ratio = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a number nor 'auto'") from None
    if not 0.0 <= ratio <= 1.0:
        raise typer.BadParameter(f"{ratio} is outside [0, 1]")
    return ratio


RatioOpt = Annotated[Optional[str], typer.Option("--recompute-ratio", "-r", callback=recompute_ratio, help=(
    "share of cached tokens recomputed (0-1), or auto: from tier bandwidth and prefill speed, per request "
    "(default: the blend config's)"))]
ChunkContextOpt = Annotated[Optional[str], typer.Option("--chunk-context", help=(
    "what each chunk is encoded after (not stored): primed (default: the template head, a passage of the "
    "corpus and the separator), bos, head (the prompt's template head) or none"))]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads")]


def known_codec(value: str | None) -> str | None:
    """Reject an unknown --codec while parsing, naming the codecs there are."""
    from kvblend.store.codecs import CODECS

    if value is not None and value not in CODECS:
        raise typer.BadParameter(f"unknown codec {value!r}; choose one of {', '.join(CODECS)}")
    return value


CodecOpt = Annotated[Optional[str], typer.Option("--codec", callback=known_codec, help=(
    "KV codec of the store: raw, fp8, int8 or int4 (default: the store config's, else raw; stored objects keep theirs)"))]


STORE_KINDS = "a store is a directory, a .yaml store config or a redis:// URL"


def check_store_spec(store: str) -> None:
    """Refuse a --store that cannot be a store (a file, a web address) with one sentence saying why."""
    from pathlib import Path

    from kvblend.config import REMOTE_SCHEMES

    if "://" in store:
        scheme = store.split("://", 1)[0]
        if f"{scheme}://" not in REMOTE_SCHEMES:
            raise ValueError(f"--store {store}: {STORE_KINDS}, not a {scheme}:// address")
        return
    path = Path(store).expanduser()
    if path.exists() and not path.is_dir() and path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"--store {store} is a file, not a store folder ({STORE_KINDS})")


def one_sentence(exc: Exception) -> str:
    """A pydantic ValidationError as 'field: problem' parts, without its dump and links; others as they are."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for e in errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def store_config(store: str | StoreConfig | None, codec: str | None) -> StoreConfig:
    """The --store spec (directory, redis:// URL, YAML file) with --codec, when given, over its codec.

    A spec that cannot be a store is a ValueError in one sentence, naming it."""
    from pydantic import ValidationError

    from kvblend.config import StoreConfig

    if isinstance(store, str):
        check_store_spec(store)
    try:
        config = StoreConfig.from_spec(store)
        return config if codec is None else StoreConfig.model_validate(config.model_dump() | {"codec": codec})
    except ValidationError as exc:
        raise ValueError(f"store {store}: {one_sentence(exc)}") from None


def make_kvblend(model: str, store: str | StoreConfig | None, device: str, dtype: str, engine: str = "hf",
                 threads: int | None = None, codec: str | None = None, **blend):
    """Build a KVBlend from CLI options; errors become a clean exit with the message.

    Commands use it as `with make_kvblend(...) as kb:` so the store's background writes land (and
    vLLM's processes stop) before the command returns."""
    from kvblend import BlendConfig, KVBlend, KVBlendConfig
    from kvblend.api import ENGINES

    if engine not in ENGINES:
        raise typer.BadParameter(f"unknown engine {engine!r} (available: {', '.join(ENGINES)})", param_hint="--engine")
    blend = {name: value for name, value in blend.items() if value is not None}  # unset options keep the defaults
    try:
        cfg = KVBlendConfig(model=model, store=store_config(store, codec), device=device, dtype=dtype, threads=threads,
                            blend=BlendConfig(**blend))
        with console.status(f"loading {model}"):
            kb = KVBlend(config=cfg, engine=engine)
    except (ValueError, FileNotFoundError, OSError, ImportError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    return kb


def stats_line(method: str, s) -> str:
    """One dim line of a request's RequestStats, as generate and ask print it."""
    ratio = "" if s.recompute_ratio is None else f", r {s.recompute_ratio:.2f}"
    return (f"[dim]{method}: TTFT {s.ttft_s:.3f}s, {s.tokens_total} prompt tokens, {s.tokens_cached} cached "
            f"({s.chunk_hits} hits, {s.chunk_misses} misses), {s.tokens_recomputed} recomputed{ratio}[/dim]")
