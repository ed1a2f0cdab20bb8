"""Corpus precompute on a Ray cluster: chunks stream through a Ray Data actor pool whose actors each
hold the model and write KV straight into the shared store (a directory every node mounts, or the
Redis/Valkey tier); the driver keeps the manifest and the index.

An actor hands a chunk back only once its object is in every durable tier of the store (`Landing`),
so the driver's manifest never runs ahead of the store: a driver killed mid-run leaves a manifest
the next run completes, and an actor killed mid-batch is restarted by Ray and its batch retried
(the store's writes are atomic, so nothing half-written is ever read). Chunks already stored are
hits, not encoded again.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvblend.corpus.landing import Landing
from kvblend.corpus.manifest import ChunkRecord, Manifest
from kvblend.corpus.precompute import PlannedChunk, PrecomputeReport, ensure_cached


@dataclass(frozen=True)
class RaySettings:
    """Where the cluster is ("local": start one on this machine; "auto": the running one; or an
    address), how many actors encode, and how many chunks go to an actor at a time."""

    address: str = "local"
    workers: int = 1
    batch_size: int = 8
    threads_per_worker: int = 1


class ChunkEncoder:
    """A Ray Data actor: one model, one store connection (and the index's embedder, when the run
    indexes); encodes and embeds a batch, and returns what landed."""

    def __init__(self, config: dict, embedder: str | None, index: bool):
        from kvblend.api import KVBlend
        from kvblend.config import KVBlendConfig
        from kvblend.corpus.embed import Embedder

        self.kb = KVBlend(config=KVBlendConfig.model_validate(config))
        self.embedder = Embedder(embedder) if index else None

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        texts = [str(t) for t in batch["text"]]
        with Landing(self.kb.store) as landing:  # listening before the first put, so no write goes unreported
            statuses = ensure_cached(self.kb, texts)
            for row, status in enumerate(statuses):
                (landing.found if status.hit else landing.wrote)(status.key, row)
            outcomes = dict(landing.finish())
        vectors = {"vector": self.embedder.embed(texts)} if self.embedder is not None else {}
        return vectors | {
            "row": np.asarray(batch["row"]),
            "key": np.asarray([s.key for s in statuses]),
            "tokens": np.asarray([s.tokens for s in statuses]),
            "computed": np.asarray([not s.hit for s in statuses]),
            "failures": np.asarray([json.dumps(outcomes.get(row, {"store": "the write was never reported"}))
                                    for row in range(len(statuses))]),
            "fingerprint": np.asarray([self.kb.adapter.fingerprint] * len(statuses)),
        }


def _connect(address: str) -> None:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray Data ({exc}): pip install 'kvblend[ray]'") from exc

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command draws its own
    context.print_on_execution_start = False
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")  # ends with this process
    else:
        ray.init(address=address, log_to_driver=False, logging_level="warning")


def _encoded_rows(planned: list[PlannedChunk], config: dict, ray_settings: RaySettings, gpus: float,
                  embedder: str | None, index: bool) -> Iterator[dict]:
    import ray

    _connect(ray_settings.address)
    config = dict(config, threads=ray_settings.threads_per_worker)
    items = [{"row": i, "text": p.chunk.text} for i, p in enumerate(planned)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // ray_settings.batch_size))
    # Ray Data restarts a dead actor and retries its batch (max_restarts / max_task_retries -1 by default)
    encoded = dataset.map_batches(
        ChunkEncoder, fn_constructor_kwargs={"config": config, "embedder": embedder, "index": index},
        batch_size=ray_settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=ray_settings.workers), num_cpus=ray_settings.threads_per_worker, num_gpus=gpus,
    )
    yield from encoded.iter_rows()


def store_chunks_on_ray(config: dict, planned: list[PlannedChunk], manifest: Manifest, ray_settings: RaySettings,
                        claim: Callable[[str], None], on_chunk: Callable[[PlannedChunk, bool], None] | None = None,
                        embedder: str | None = None, index: bool = True) -> PrecomputeReport:
    """Like `store_chunks`, with the encoding spread over a Ray actor pool; `config` is the
    KVBlendConfig (as a dict) every actor builds its KVBlend from. The driver loads no model:
    `claim(fingerprint)` gets the actors' model fingerprint before the first manifest line. With
    `index`, the actors also embed each chunk with `embedder`: the report's `vectors`."""
    gpus = 1.0 if str(config.get("device", "cpu")).startswith("cuda") else 0.0
    report = PrecomputeReport()
    claimed = False
    for row in _encoded_rows(planned, config, ray_settings, gpus, embedder, index):
        if not claimed:
            claim(str(row["fingerprint"]))
            claimed = True
        item = planned[int(row["row"])]
        c = item.chunk
        rec = ChunkRecord(id=c.id, source=c.source, start=c.start, end=c.end, key=str(row["key"]), tokens=int(row["tokens"]), text=c.text)
        failures = json.loads(str(row["failures"]))
        computed = bool(row["computed"])
        if failures:
            report.failed.append((rec, failures))
        else:
            manifest.append(rec)
            if "vector" in row:
                report.vectors[rec.key] = row["vector"]
            report.encoded += computed
            report.skipped += not computed
            report.tokens_encoded += rec.tokens if computed else 0
        if on_chunk:
            on_chunk(item, computed)
    return report
