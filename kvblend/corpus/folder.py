"""The corpus folder kept beside a KV store: which model made it, the manifest, the faiss index.

    <store dir>/corpus/corpus.json     model name and fingerprint (a store is tied to one model)
    <store>/corpus/manifest.jsonl  one line per stored chunk
    <store>/corpus/index.faiss     chunk embeddings; index.json maps rows to chunk ids
    <store>/corpus/precompute.lock held by the one precompute writing here (pid, host)
"""
from __future__ import annotations

import json
from pathlib import Path

from kvblend.corpus.atomic import write_atomic
from kvblend.corpus.index import ChunkIndex
from kvblend.corpus.lock import PrecomputeLock
from kvblend.corpus.manifest import Manifest


class CorpusError(ValueError):
    """A corpus folder that cannot serve this request; the message says what to do."""


class CorpusFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    @classmethod
    def for_store(cls, store: str, corpus: str | Path | None = None) -> "CorpusFolder":
        """`corpus` if given, else DIR/corpus inside the store's disk directory (the disk tier ignores it)."""
        if corpus is not None:
            return cls(corpus)
        from kvblend.config import StoreConfig

        disk = StoreConfig.from_spec(store).disk_dir
        if not disk:
            raise CorpusError(f"store {store!r} has no disk directory to keep the corpus index in: pass --corpus DIR")
        if Path(disk).expanduser().exists() and not Path(disk).expanduser().is_dir():
            raise CorpusError(f"store {disk} is a file, not a store folder: give a directory (or a .yaml store config)")
        return cls(Path(disk).expanduser() / "corpus")

    @property
    def info_path(self) -> Path:
        return self.root / "corpus.json"

    def check_model(self, model: str, fingerprint: str) -> None:
        """Refuse a corpus made with another model: its caches would all be misses, its keys wrong."""
        if not self.info_path.exists():
            return
        info = json.loads(self.info_path.read_text())
        if info.get("fingerprint") != fingerprint:
            raise CorpusError(f"{self.root} was built with model {info.get('model')!r} (fingerprint {info.get('fingerprint')}), "
                              f"not {model!r} ({fingerprint}): pass --model {info.get('model')} or use another --store")

    def claim(self, model: str, fingerprint: str) -> None:
        self.check_model(model, fingerprint)
        if not self.info_path.exists():
            write_atomic(self.info_path, json.dumps({"model": model, "fingerprint": fingerprint}).encode())

    def has_index(self) -> bool:
        return (self.root / "index.json").exists()

    def manifest(self) -> Manifest:
        return Manifest(self.root / "manifest.jsonl")

    def lock(self) -> PrecomputeLock:
        """The lock a precompute holds while it writes here (CorpusLocked, naming the holder, if taken)."""
        return PrecomputeLock(self.root)

    def load_index(self) -> ChunkIndex:
        if not (self.root / "index.json").exists():
            raise CorpusError(f"no chunk index in {self.root}: run `kvblend precompute PATH... --store {self.root.parent}` "
                              "(with --index) first")
        return ChunkIndex.load(self.root, self.manifest().records)

    def save_index(self, index: ChunkIndex) -> None:
        index.save(self.root)
