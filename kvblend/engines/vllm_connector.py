"""kvblend's out-of-tree vLLM KV connector: blends a RAG prompt inside vLLM's worker.

Loaded by vLLM itself (no patch), in the scheduler process and in each worker:

    KVTransferConfig(kv_connector="KVBlendConnector",
                     kv_connector_module_path="kvblend.engines.vllm_connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"store": ...})   # kvblend.engines.vllm.connector_config()

Scheduler side: a request whose `kv_transfer_params` carry a blend plan (`vllm_blend.PLAN`) for
tokens its prompt starts with gets those tokens, up to all but the prompt's last, reported as
externally computed; vLLM computes the rest (at least the last token) and decodes. Anything else
passes through untouched. vLLM's prefix caching may stay on: blended requests carry their plan's
`cache_salt` (`blend_salt`), so blocks a blend filled never match an exact request, and a plan
sent without its salt is ignored.

Worker side: each plan is blended in `start_load_kv`, one request after another before the
step's forward, on the model vLLM loaded (vLLM started with `load_format="kvblend"`; see
`vllm_blend`) with the store of the extra config's `store` (a StoreConfig as a dict). The fused KV
is written into the paged cache layer by layer, in `wait_for_layer_load` just before each layer's
attention, with the attention backend's own write (`impl.do_kv_cache_update`:
`cpu_attn_reshape_and_cache` on CPU, `reshape_and_cache_flash` on CUDA FlashAttention). A blend
that fails (no kvblend load format, no store configured or one that cannot be opened, any error) is
reported as failed blocks: vLLM recomputes the request. The blend's counts and times
(`RequestStats` fields) go back to the scheduler with the step's output (`BlendReports`, vLLM's
worker-metadata channel) and reach the caller in the finished output's `kv_transfer_params` as
`kvblend_blend` (empty: vLLM recomputed the request).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole,
                                                              KVConnectorWorkerMetadata)

from kvblend.engines.vllm_blend import PLAN, REPORT_PARAM, FusedKV, WorkerBlender, blend_salt, plan_tokens

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"no layer index in attention layer name {layer_name!r}")
    return int(match.group(1))


@dataclass
class LoadSpec:
    """Blend a request's plan (whose id is `key`) and write tokens start..end-1 of its fused KV into its blocks."""

    req_id: str
    key: str
    start: int
    end: int
    plan: dict[str, Any]
    block_ids: list[int] = field(default_factory=list)


@dataclass
class KVBlendMetadata(KVConnectorMetadata):
    """One step's work for the workers: plain data, pickled across processes."""

    loads: list[LoadSpec] = field(default_factory=list)


@dataclass
class BlendReports(KVConnectorWorkerMetadata):
    """Worker to scheduler, once per step: the counts and times (`RequestStats` fields) of each
    request whose plan the worker blended and wrote in that step."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "BlendReports":
        return BlendReports(self.reports | getattr(other, "reports", {}))


@dataclass
class _ActiveLoad:
    spec: LoadSpec
    fused: FusedKV
    slots: torch.Tensor
    pending: set[str]


class KVBlendConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise NotImplementedError("KVBlendConnector supports one worker (tensor and pipeline parallel size 1)")
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._block_size = vllm_config.cache_config.block_size
        self._prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        # scheduler side
        self._loads: dict[str, LoadSpec] = {}
        self._blending: set[str] = set()  # requests whose plan went to the worker, not finished yet
        self._reports: dict[str, dict[str, Any]] = {}  # their blend reports, until they finish
        self._awaiting: dict[str, dict[str, Any]] = {}  # finished in the step that blended them: filled when its report comes
        # worker side
        self._kv_layers: list[str] = []
        self._layers: dict[str, Any] = {}
        self._active: list[_ActiveLoad] = []
        self._failed_blocks: set[int] = set()
        self._step_reports: dict[str, dict[str, Any]] = {}
        self._blender = WorkerBlender(extra.get("store"))

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # nothing leaves vLLM through this connector: it only fills blocks

    # -- scheduler side -------------------------------------------------------------------------
    def _matching(self, request: "Request") -> tuple[str, int, dict[str, Any]] | None:
        """(plan id, tokens it covers, plan) when the request carries a blend plan of tokens its prompt starts with."""
        params = request.kv_transfer_params or {}
        if PLAN not in params:
            return None
        prompt = list(request.prompt_token_ids or [])
        plan = params[PLAN]
        ids = plan_tokens(plan)
        if ids is None or len(ids) > len(prompt) or prompt[: len(ids)] != ids:
            log.warning("request %s's blend plan is malformed or not for its prompt: vLLM prefills it", request.request_id)
            return None
        key = plan["id"]
        if self._prefix_caching and request.cache_salt != blend_salt(key):
            log.warning("request %s carries blend plan %r without its cache_salt: with prefix caching on, its blended "
                        "blocks could serve exact requests, so vLLM prefills it", request.request_id, key)
            return None
        return key, min(len(ids), len(prompt) - 1), plan

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        match = self._matching(request)
        if match is None:
            return 0, False
        return max(0, match[1] - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens > 0 and (match := self._matching(request)) is not None:
            key, covered, plan = match
            self._loads[request.request_id] = LoadSpec(request.request_id, key, covered - num_external_tokens, covered, plan)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        """Hand each request whose blocks were just allocated (new or resumed) its load."""
        meta = KVBlendMetadata()
        cached = scheduler_output.scheduled_cached_reqs
        scheduled = [(new.req_id, list(new.block_ids[0])) for new in scheduler_output.scheduled_new_reqs]
        scheduled += [(req_id, list(blocks[0]) if blocks is not None else [])
                      for req_id, blocks in zip(cached.req_ids, cached.new_block_ids)]
        for req_id, blocks in scheduled:
            if req_id in self._loads:
                spec = self._loads.pop(req_id)
                spec.block_ids = blocks  # a new or resumed request's full block list
                meta.loads.append(spec)
                self._blending.add(req_id)
                self._reports.pop(req_id, None)  # blended again after a preemption: only the new blend counts
        return meta

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        meta = connector_output.kv_connector_worker_meta
        for req_id, report in (meta.reports if isinstance(meta, BlendReports) else {}).items():
            if req_id in self._awaiting:
                self._awaiting[req_id].update(report)
            elif req_id in self._blending:
                self._reports[req_id] = report
        self._awaiting.clear()  # a report comes with the step that blended: none left to wait for

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._loads.pop(req_id, None)
        if req_id not in self._blending:
            return False, None
        self._blending.discard(req_id)
        # A request can finish in the step that blended it (one token asked for): vLLM frees it
        # before it hands this connector that step's worker output, and sends the output only after,
        # so the report is written into the params here when it comes (update_connector_output).
        return False, {REPORT_PARAM: self._reports.pop(req_id, None) or self._awaiting.setdefault(req_id, {})}

    # -- worker side ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_layers = list(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVBlendMetadata)
        self._layers = forward_context.no_compile_layers
        if self._active or not meta.loads:
            return  # called again after the forward (async-load hook); our loads are synchronous
        for spec in meta.loads:
            try:  # blended here, one request after another, before the step's forward
                fused, stats = self._blender.fused_kv(spec.plan)
                self._step_reports[spec.req_id] = stats.as_dict()
            except Exception as exc:  # not blendable: vLLM recomputes these blocks
                log.warning("blend %s failed (%s): vLLM recomputes request %s", spec.key, exc, spec.req_id)
                self._fail(spec)
                continue
            pos = torch.arange(spec.start, spec.end)
            blocks = torch.tensor(spec.block_ids, dtype=torch.long)
            slots = blocks[pos // self._block_size] * self._block_size + pos % self._block_size
            self._active.append(_ActiveLoad(spec, fused, slots, set(self._kv_layers)))

    def wait_for_layer_load(self, layer_name: str) -> None:
        for load in self._active:
            if layer_name not in load.pending:
                continue
            load.pending.discard(layer_name)
            layer = self._layers[layer_name]
            try:
                k, v = load.fused.layer(layer_index(layer_name), load.spec.start, load.spec.end)
                cache = layer.kv_cache
                layer.impl.do_kv_cache_update(layer, k.to(cache.device, cache.dtype), v.to(cache.device, cache.dtype),
                                              cache, load.slots.to(cache.device))
            except Exception as exc:
                log.warning("blend %s layer %s failed (%s): vLLM recomputes request %s", load.spec.key, layer_name, exc, load.spec.req_id)
                self._fail(load.spec)
                load.pending.clear()

    def _fail(self, spec: LoadSpec) -> None:
        self._step_reports.pop(spec.req_id, None)  # vLLM recomputes it: no blend to report
        first, last = spec.start // self._block_size, (spec.end - 1) // self._block_size
        self._failed_blocks.update(spec.block_ids[first : last + 1])

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # nothing is saved from vLLM's cache: chunks are encoded by kvblend (precompute, missed chunks)

    def wait_for_save(self):
        for load in self._active:
            if load.pending:  # the layer hooks never ran for these layers: do not trust the cache
                log.error("blend %s: layers %s were not loaded; vLLM recomputes", load.spec.key, sorted(load.pending))
                self._fail(load.spec)
        self._active = []  # the step's fused KV is written: drop it

    def build_connector_worker_meta(self) -> BlendReports | None:
        reports, self._step_reports = self._step_reports, {}
        return BlendReports(reports) if reports else None

    def shutdown(self) -> None:
        self._blender.close()

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed
