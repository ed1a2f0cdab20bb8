"""The corpus folder kept beside a KV store: which model made it, the manifest, the faiss index.

    <store dir>/corpus/corpus.json     model name and fingerprint (a store is tied to one model), and
                                   the chunk encoding (chunk context, primer) every chunk was made with
    <store>/corpus/manifest.jsonl  one line per stored chunk
    <store>/corpus/index.faiss     chunk embeddings; index.json maps rows to chunk ids
    <store>/corpus/precompute.lock held by the one precompute writing here (pid, host)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from kvblend.corpus.atomic import write_atomic
from kvblend.corpus.index import ChunkIndex
from kvblend.corpus.lock import PrecomputeLock
from kvblend.corpus.manifest import Manifest

log = logging.getLogger(__name__)


ENCODING_FIELDS = ("chunk_context", "primer")  # the BlendConfig fields that decide a chunk's KV (and its key)
LEGACY_ENCODING = {"chunk_context": "bos", "primer": None}  # corpora recorded before their encoding was


class CorpusError(ValueError):
    """A corpus folder that cannot serve this request; the message says what to do."""


def encoding_of(blend) -> dict:
    """A BlendConfig's chunk encoding, as corpus.json records it."""
    return {name: getattr(blend, name) for name in ENCODING_FIELDS}


def describe(encoding: dict) -> str:
    primer = encoding.get("primer")
    return f"chunk_context={encoding.get('chunk_context')!r}" + (f", primer {primer[:60]!r}..." if primer else "")


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
        return cls.beside(disk)

    @classmethod
    def beside(cls, disk_dir: str | Path) -> "CorpusFolder":
        """The corpus folder inside a store's disk directory."""
        return cls(Path(disk_dir).expanduser() / "corpus")

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

    def encoding(self) -> dict | None:
        """How this corpus's chunks were encoded (chunk context, primer); None for a new corpus."""
        if not self.info_path.exists():
            return None
        return json.loads(self.info_path.read_text()).get("chunk_encoding", LEGACY_ENCODING)

    def claim(self, model: str, fingerprint: str, encoding: dict) -> None:
        """Record the model and chunk encoding of a new corpus; refuse a model or encoding other than its own."""
        self.check_model(model, fingerprint)
        recorded = self.encoding()
        if recorded is None:
            info = {"model": model, "fingerprint": fingerprint, "chunk_encoding": encoding}
            write_atomic(self.info_path, json.dumps(info, ensure_ascii=False).encode())
        elif recorded != encoding:
            raise CorpusError(f"{self.root}'s chunks were encoded with {describe(recorded)}, not {describe(encoding)}: "
                              "its stored KV would all be misses; use the corpus's encoding or another --store")

    def adopt_encoding(self, blend):
        """`blend` with this corpus's chunk encoding when `blend` has the default one (its chunks then
        hit); another explicit encoding is kept, with a warning that the stored chunks will be misses."""
        from kvblend.config import BlendConfig

        recorded = self.encoding()
        if recorded is None or encoding_of(blend) == recorded:
            return blend
        if encoding_of(blend) == encoding_of(BlendConfig()):
            return BlendConfig.model_validate({**blend.model_dump(), **recorded})
        log.warning("%s: its chunks were encoded with %s; this instance encodes with %s, so they will be misses",
                    self.root, describe(recorded), describe(encoding_of(blend)))
        return blend

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
