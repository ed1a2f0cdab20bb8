"""A store that keeps chunks in memory and writes them through to a directory of safetensors files."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from kvblend.store.base import ChunkKV

log = logging.getLogger(__name__)


class DirectoryStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, ChunkKV] = {}

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        return key in self._memory or self._path(key).exists()

    def get(self, key: str) -> ChunkKV | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                meta = f.metadata()
            tensors = load_file(path)
            kv = ChunkKV(key=meta["key"], fingerprint=meta["fingerprint"], keys=tensors["keys"], values=tensors["values"])
        except Exception as exc:  # a damaged object is a miss, never a crash
            log.warning("store object %s unreadable (%s): treated as a miss", path, exc)
            return None
        if kv.key != key:
            log.warning("store object %s holds key %s: treated as a miss", path, kv.key)
            return None
        self._memory[key] = kv
        return kv

    def put(self, key: str, kv: ChunkKV) -> None:
        self._memory[key] = kv
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"keys": kv.keys.contiguous(), "values": kv.values.contiguous()}, tmp, metadata={"key": key, "fingerprint": kv.fingerprint})
        os.replace(tmp, path)
