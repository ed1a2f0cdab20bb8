"""`kvblend serve`: an OpenAI-compatible endpoint (vLLM's server) whose RAG requests are blended."""
from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from kvblend.cli import app
from kvblend.cli.common import CodecOpt, DeviceOpt, DtypeOpt, ModelOpt, RatioOpt, ThreadsOpt, console, store_config


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: ModelOpt = "smollm2-135m",
    store: Annotated[Optional[str], typer.Option(help="KV store directory or redis:// URL (required: vLLM's worker reads it)")] = None,
    codec: CodecOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    recompute_ratio: RatioOpt = None,
    kv_cache_bytes: Annotated[str, typer.Option(help="vLLM's KV cache size, e.g. 1GiB")] = "1GiB",
    max_model_len: Annotated[Optional[int], typer.Option(min=2, help="longest prompt + answer (default: the model's)")] = None,
    precompute_misses: Annotated[bool, typer.Option(help="encode chunks missing from the store after answering")] = True,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
):
    """Serve /v1/completions and /v1/chat/completions; a body's `kvblend: {"chunks": [...]}` is blended.

    vLLM blends inside its worker on its own weights, with the chunks of --store (a folder or a
    redis:// URL: the worker opens it). Options kvblend does not know are passed to vLLM's server (e.g. --api-key, --max-num-seqs).
    Needs vLLM: pip install 'kvblend\\[vllm]' on CPU (docs/vllm.md).
    """
    from kvblend.config import BlendConfig, KVBlendConfig, parse_bytes
    from kvblend.engines.vllm import connector_config, tune_worker_environment
    from kvblend.engines.vllm_plugin import LOAD_FORMAT
    from kvblend.engines.vllm_serve import MIDDLEWARE, SETTINGS_ENV, run_vllm_server
    from kvblend.models import resolve_model

    try:
        cfg = KVBlendConfig(model=model, store=store_config(store, codec), device=device, dtype=dtype, threads=threads,
                            blend=BlendConfig() if recompute_ratio is None else BlendConfig(recompute_ratio=recompute_ratio))
        folder = resolve_model(model)
        cache_bytes = parse_bytes(kv_cache_bytes)
        if not isinstance(cache_bytes, int):
            raise ValueError(f"--kv-cache-bytes: {kv_cache_bytes!r} is not a size (e.g. 512MiB, 1GiB)")
        if not cfg.store.persistent:
            raise ValueError("kvblend serve needs --store (a folder or a redis:// URL): vLLM's worker reads the chunks from it")
    except (ValueError, FileNotFoundError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    os.environ[SETTINGS_ENV] = json.dumps({"kvblend": cfg.model_dump(mode="json"), "precompute_misses": precompute_misses})
    vllm_args = [
        "--model", folder, "--dtype", dtype, "--host", host, "--port", str(port),
        "--no-enable-prefix-caching", "--kv-cache-memory-bytes", str(cache_bytes),
        "--kv-transfer-config", json.dumps(connector_config(cfg.store)),
        "--middleware", MIDDLEWARE, "--load-format", LOAD_FORMAT,
    ]
    if max_model_len:
        vllm_args += ["--max-model-len", str(max_model_len)]
    if "--served-model-name" not in ctx.args:
        vllm_args += ["--served-model-name", model]
    if device == "cpu":
        tune_worker_environment(threads)  # for vLLM's engine processes (this one started without it)
    run_vllm_server(vllm_args + list(ctx.args))
