"""KV stores: the interface the blend uses, the tiers, and `open_store` to build them from config."""
from __future__ import annotations

import logging

import torch

from kvblend.config import StoreConfig
from kvblend.store.base import ChunkKV, KVStore
from kvblend.store.consumer import reject, with_recompute
from kvblend.store.controller import LoadingController, choose_recompute_ratio
from kvblend.store.disk import DiskStore
from kvblend.store.lazy import LazyChunk
from kvblend.store.memory import MemoryStore
from kvblend.store.prefetch import start_prefetch
from kvblend.store.tiered import TieredStore

log = logging.getLogger(__name__)


def open_store(spec: str | StoreConfig | None = None) -> TieredStore:
    """The tiers a StoreConfig asks for (a str is a directory, a redis:// URL or a YAML file)."""
    cfg = StoreConfig.from_spec(spec)
    cuda = torch.cuda.is_available()
    memory = []
    if cfg.gpu_bytes and cuda:
        memory.append(MemoryStore(cfg.gpu_bytes, device="cuda", name="gpu"))
    elif cfg.gpu_bytes:
        log.info("no CUDA device: the GPU tier (%d bytes) is left out", cfg.gpu_bytes)
    if cfg.cpu_bytes:
        memory.append(MemoryStore(cfg.cpu_bytes, pin=cuda, name="cpu"))
    serialized = []
    if cfg.disk_dir:
        serialized.append(DiskStore(cfg.disk_dir, cfg.disk_bytes, cfg.codec, pin=cuda, mmap=cfg.disk_mmap, read_codec=cfg.codec))
    if cfg.remote_url:
        try:
            from kvblend.store.remote import RedisStore
        except ImportError as exc:
            raise ValueError(f"remote_url {cfg.remote_url} needs the redis client: pip install 'kvblend[redis]'") from exc
        serialized.append(RedisStore(cfg.remote_url, cfg.codec, pin=cuda, retry_s=cfg.remote_retry_s, read_codec=cfg.codec))
    return TieredStore(memory, serialized, cfg.codec, cfg.async_writes, LoadingController(cfg.min_recompute_ratio))


__all__ = [
    "ChunkKV", "DiskStore", "KVStore", "LazyChunk", "LoadingController", "MemoryStore",
    "StoreConfig", "TieredStore", "choose_recompute_ratio", "open_store", "reject", "start_prefetch", "with_recompute",
]
