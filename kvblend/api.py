"""The Python API: `KVBlend` precomputes chunk caches and answers questions over chunks."""
from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property

import torch

from kvblend.blend.chunks import chunk_key, encode_chunk, resolve_chunk_context
from kvblend.blend.executor import REUSE, BlendExecutor
from kvblend.blend.lookup import cached_spans, lookup_chunk
from kvblend.blend.plan import Prompt, PromptBuilder
from kvblend.config import BlendConfig, KVBlendConfig
from kvblend.engines.base import Engine, Request
from kvblend.engines.hf import HFEngine, full_prefill, to_dynamic_cache
from kvblend.engines.sampling import Sampling
from kvblend.models import DTYPES, LayerwiseModel, load_tokenizer, load_weights, resolve_model, stop_token_ids
from kvblend.models.fingerprint import checkpoint_fingerprint
from kvblend.results import PREFILL_METHODS, GenerateResult, Method, Prefill, RequestStats
from kvblend.store import ChunkKV, KVStore, choose_recompute_ratio, open_store

ENGINES = ("hf", "vllm")


class KVBlend:
    """Blend-aware RAG generation over one model and one KV store.

    >>> kb = KVBlend()                              # SmolLM2-135M on CPU, caches in memory
    >>> kb.precompute(["chunk one ...", "chunk two ..."])
    >>> kb.generate(["chunk two ...", "chunk one ..."], "question?").text

    engine="vllm" serves with vLLM instead of transformers: vLLM blends inside its worker on its own
    weights, with a store the worker opens too (a memory-only store gets a temporary disk tier,
    removed at close; this process keeps no memory tier): docs/vllm.md.
    Whatever the engine, `KVBlend` plans, prefills and builds the results; the engine turns
    requests into tokens (kvblend.engines.base). The transformers weights load when first needed:
    at once, unless `lazy_weights` or engine="vllm" (whose blends run on vLLM's weights, so this
    process loads them only to encode chunks).
    """

    def __init__(
        self,
        model: str | None = None,
        store: str | KVStore | None = None,
        device: str | None = None,
        dtype: str | None = None,
        config: KVBlendConfig | BlendConfig | None = None,
        engine: str = "hf",
        lazy_weights: bool = False,
    ):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if isinstance(config, BlendConfig):
            config = KVBlendConfig(blend=config)
        config = (config or KVBlendConfig()).model_copy()
        for name, value in (("model", model), ("device", device), ("dtype", dtype)):
            if value is not None:
                setattr(config, name, value)
        if isinstance(store, str) or store is None:
            config.store = store if store is not None else config.store
        self.config = KVBlendConfig.model_validate(config.model_dump())
        if self.config.store.disk_dir:  # chunks the store holds were encoded as its corpus records
            from kvblend.corpus.folder import CorpusFolder

            self.config.blend = CorpusFolder.beside(self.config.store.disk_dir).adopt_encoding(self.config.blend)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.tokenizer = load_tokenizer(self.config.model)
        self.builder = PromptBuilder(self.tokenizer)
        self.stop_ids = stop_token_ids(self.config.model, self.tokenizer)
        self._owns_store = store is None or isinstance(store, str)
        self._scratch = None
        opened = self.config.store
        if engine == "vllm" and self._owns_store:
            from kvblend.engines.vllm import planner_store

            if not opened.persistent:
                # vLLM's worker opens the store itself: memory only would leave it another, empty one. A
                # temporary folder stands in, as large as the memory tier and in its codec (raw: exact).
                self._scratch = tempfile.TemporaryDirectory(prefix="kvblend-store-")
                self.config.store = opened.model_copy(update={"disk_dir": self._scratch.name, "disk_bytes": opened.cpu_bytes})
            opened = planner_store(self.config.store)  # the worker keeps the memory tiers; this process plans
        self.store: KVStore = open_store(opened) if self._owns_store else store
        self.context_ids = resolve_chunk_context(self.config.blend.chunk_context, self.builder, self.config.blend.primer)
        if not (lazy_weights or engine == "vllm"):
            self.adapter  # loads the weights now
        self.engine: Engine = HFEngine(self)
        if engine != "hf":
            from kvblend.engines.vllm import VLLMEngine

            try:
                self.engine = VLLMEngine(self)
            except BaseException:
                self.close()  # the store, and its temporary folder
                raise

    # -- the weights, loaded on first use (at once unless lazy_weights or engine="vllm") ------------------
    @cached_property
    def model(self):
        """The transformers model (kvblend's own blends, encodings and decoding run on it)."""
        return load_weights(self.config.model, self.config.device, self.config.dtype)

    @cached_property
    def adapter(self) -> LayerwiseModel:
        return LayerwiseModel(self.model)

    @cached_property
    def executor(self) -> BlendExecutor:
        return BlendExecutor(self.adapter, self.config.blend)

    @property
    def weights_loaded(self) -> bool:
        return "model" in self.__dict__

    @cached_property
    def fingerprint(self) -> str:
        """The model's identity in chunk keys: the loaded model's, or, while the weights are not
        loaded (a process that only plans blends for vLLM's worker), the same value computed from the
        checkpoint's files."""
        if self.weights_loaded:
            return self.adapter.fingerprint
        try:
            return checkpoint_fingerprint(resolve_model(self.config.model), DTYPES[self.config.dtype])
        except FileNotFoundError:  # not safetensors: only the loaded model can say
            return self.adapter.fingerprint

    def with_engine(self, engine: Engine) -> "KVBlend":
        """The same model, store and settings, answering through another engine (closing it closes that engine only)."""
        view = copy.copy(self)
        view.engine, view._owns_store = engine, False
        return view

    def close(self) -> None:
        """Stop the decoding engine and land the store's background writes (closing the store if kvblend opened it)."""
        try:
            self.engine.close()
        finally:
            finish = getattr(self.store, "close" if self._owns_store else "flush", None)
            if finish is not None:
                finish()
            if self._owns_store and self._scratch is not None:
                self._scratch.cleanup()
                self._scratch = None

    def __enter__(self) -> "KVBlend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- chunks -------------------------------------------------------------------------------
    def key_for(self, token_ids: list[int]) -> str:
        return chunk_key(self.fingerprint, self.context_ids, token_ids, DTYPES[self.config.dtype])

    def precompute(self, texts: Iterable[str], on_chunk: Callable[[int, bool], None] | None = None) -> list[str]:
        """Encode each text's KV into the store (skipping those already there and valid); returns their keys.

        on_chunk(num_tokens, computed) is called after each text, for progress reporting.
        """
        texts = list(texts)
        keys = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"chunk {i} is empty")
            ids = self.builder.encode(text)
            key = self.key_for(ids)
            computed = self._lookup(key, len(ids)) is None  # absent, damaged or foreign: encode again
            if computed:
                self.store.put(key, encode_chunk(self.adapter, self.context_ids, ids, key))
            keys.append(key)
            if on_chunk:
                on_chunk(len(ids), computed)
        self.engine.warm(texts)
        return keys

    def _lookup(self, key: str, n_tokens: int) -> ChunkKV | None:
        """A usable cache for this chunk, or None (kvblend.blend.lookup.lookup_chunk)."""
        return lookup_chunk(self.store, self.adapter, key, n_tokens)

    # -- prompts --------------------------------------------------------------------------------
    def build_prompt(self, chunks: list[str], question: str) -> Prompt:
        return self.builder.build(list(chunks), question)

    def prefill(self, chunks: list[str], question: str, method: Method = "blend", config: BlendConfig | None = None,
                profile: bool = False, prompt: Prompt | None = None, ranking: torch.Tensor | None = None) -> Prefill:
        """Run the prompt's prefill by `method`; the result holds the cache and first-token logits.

        `prompt` is `build_prompt(chunks, question)` when the caller has built it already.
        `ranking` is research only (BlendExecutor.run)."""
        if method not in PREFILL_METHODS:
            raise ValueError(f"unknown prefill method {method!r}; choose one of {PREFILL_METHODS}")
        t0 = time.perf_counter()
        if prompt is None:
            prompt = self.build_prompt(chunks, question)
        ids = torch.tensor(prompt.ids, device=self.adapter.device)
        stats = RequestStats(method=method, tokens_total=ids.numel())
        if ids.numel() > self.adapter.max_positions:
            raise ValueError(f"prompt of {ids.numel()} tokens exceeds the model's context of {self.adapter.max_positions} positions")
        if method == "full":
            cache, logits = full_prefill(self.model, ids)
            stats.tokens_recomputed = 0
        else:
            located = [(start, seg.ids, self.key_for(seg.ids)) for seg, start in zip(prompt.segments, prompt.starts())
                       if seg.chunk is not None]
            spans, found = cached_spans(self.store, self.adapter, self.context_ids, located, self.config.store.prefetch_layers)
            sources = [s.kv for s in spans]
            if method == "blend":
                config = choose_recompute_ratio(self.store, config or self.config.blend, sources, ids.numel(), self.adapter)
            stats.stages_s["lookup"] = time.perf_counter() - t0
            cfg = REUSE if method == "reuse" else (config or self.config.blend)
            stats.recompute_ratio = cfg.recompute_ratio
            out = self.executor.run(ids, spans, question_start=prompt.starts()[-1], config=cfg, profile=profile, ranking=ranking)
            cache = to_dynamic_cache(self.model.config, out.keys, out.values)
            logits = out.logits
            stats.count_blend(spans, found, out.selected.numel())
            stats.stages_s.update(out.timings)
        stats.ttft_s = time.perf_counter() - t0
        return Prefill(ids=ids, cache=cache, logits=logits, stats=stats)

    # -- generation -----------------------------------------------------------------------------
    def answer_text(self, tokens: Sequence[int]) -> str:
        """The answer's text: stop tokens and special tokens left out."""
        return self.tokenizer.decode([t for t in tokens if t not in self.stop_ids], skip_special_tokens=True).strip()

    def _run(self, requests: Sequence[Request], max_new_tokens: int, method: Method, sampling: Sampling | None,
             config: BlendConfig | None, keep_prefill: bool = False):
        if method not in self.engine.methods:
            raise ValueError(f"method {method!r} is not available on the {type(self.engine).__name__}; "
                             f"choose one of {self.engine.methods}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return self.engine.run(requests, max_new_tokens, method, sampling or Sampling(), config, keep_prefill)

    def stream(self, chunks: list[str], question: str, max_new_tokens: int = 64, method: Method = "blend",
               sampling: Sampling | None = None, config: BlendConfig | None = None) -> Iterator[int]:
        """Yield generated token ids as they come."""
        for event in self._run([(chunks, question)], max_new_tokens, method, sampling, config):
            yield from event.tokens

    def generate_many(self, requests: Sequence[Request], max_new_tokens: int = 64, method: Method = "blend",
                      sampling: Sampling | None = None, config: BlendConfig | None = None,
                      on_text: Callable[[int, str], None] | None = None, keep_prefill: bool = False) -> list[GenerateResult]:
        """Answer several (chunks, question) requests; an engine that batches (vLLM) decodes them together.

        on_text(request index, text) gets each request's new text as it comes. With keep_prefill the
        results hold the prefill (cache and first-token logits) where the engine has one (transformers)."""
        tokens: list[list[int]] = [[] for _ in requests]
        stats: list[RequestStats | None] = [None] * len(requests)
        prefills: list[Prefill | None] = [None] * len(requests)
        for event in self._run(requests, max_new_tokens, method, sampling, config, keep_prefill):
            tokens[event.index] += event.tokens
            stats[event.index], prefills[event.index] = event.stats, event.prefill or prefills[event.index]
            if on_text and event.tokens:
                on_text(event.index, self.tokenizer.decode(event.tokens, skip_special_tokens=True))
        return [GenerateResult(self.answer_text(t), t, s.ttft_s, s, p) for t, s, p in zip(tokens, stats, prefills)]

    def generate(self, chunks: list[str], question: str, max_new_tokens: int = 64, method: Method = "blend",
                 sampling: Sampling | None = None, config: BlendConfig | None = None,
                 on_text: Callable[[str], None] | None = None, keep_prefill: bool = False) -> GenerateResult:
        """Answer `question` over `chunks` (in the given order)."""
        each = (lambda _, text: on_text(text)) if on_text else None
        return self.generate_many([(chunks, question)], max_new_tokens, method, sampling, config, each, keep_prefill)[0]
