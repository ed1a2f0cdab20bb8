"""A faiss index over chunk embeddings, saved beside the manifest it points into.

Identical chunk texts (same key) are indexed once, so the top-k never repeats a passage. The index
follows the whole manifest, not one run: `cover` keeps the rows of chunks the manifest still
records, embeds the ones it lacks and drops the rest, so adding documents to a corpus adds to its
index. Rows are tied to chunk keys (the text's tokens), so a row stays right whatever id points to it.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvblend.corpus.atomic import write_atomic
from kvblend.corpus.embed import Embedder
from kvblend.corpus.manifest import ChunkRecord

log = logging.getLogger(__name__)


def first_per_key(records: Sequence[ChunkRecord]) -> dict[str, ChunkRecord]:
    """One record per chunk key, the first in order."""
    unique: dict[str, ChunkRecord] = {}
    for r in records:
        unique.setdefault(r.key, r)
    return unique


@dataclass
class Hit:
    record: ChunkRecord
    score: float


class ChunkIndex:
    """Inner-product search over unit vectors (cosine), row i ↔ records[i]."""

    def __init__(self, records: list[ChunkRecord], faiss_index, embedder: str, behind: Sequence[ChunkRecord] = ()):
        self.records = records
        self.faiss_index = faiss_index
        self.embedder = embedder
        self.behind = list(behind)  # manifest chunks not indexed yet (a run that stopped before saving the index)

    @classmethod
    def build(cls, records: Sequence[ChunkRecord], embedder: Embedder, batch_size: int = 32,
              on_batch: Callable[[int], None] | None = None) -> "ChunkIndex":
        import faiss

        return cls([], faiss.IndexFlatIP(embedder.dim), embedder.name).cover(records, embedder, batch_size, on_batch)

    def keys(self) -> set[str]:
        return {r.key for r in self.records}

    def missing(self, records: Sequence[ChunkRecord]) -> list[ChunkRecord]:
        """Chunks of `records` with no row here (one per key)."""
        have = self.keys()
        return [r for key, r in first_per_key(records).items() if key not in have]

    def cover(self, records: Sequence[ChunkRecord], embedder: Embedder, batch_size: int = 32,
              on_batch: Callable[[int], None] | None = None, vectors: dict[str, np.ndarray] | None = None) -> "ChunkIndex":
        """An index of exactly `records`' chunks (one row per key): rows kept, missing chunks embedded, others
        dropped. `vectors` (key → the embedder's vector, e.g. computed by precompute's Ray actors) are used
        as they are instead of embedding those chunks again."""
        import faiss

        if embedder.dim != self.faiss_index.d or embedder.name != self.embedder:
            raise ValueError(f"the index was built with {self.embedder} ({self.faiss_index.d}-d); cannot add "
                             f"{embedder.name} ({embedder.dim}-d) vectors to it")
        wanted = first_per_key(records)
        rows = [i for i, r in enumerate(self.records) if r.key in wanted]
        index = faiss.IndexFlatIP(self.faiss_index.d)
        if rows:
            index.add(self.faiss_index.reconstruct_n(0, self.faiss_index.ntotal)[rows])
        kept = [wanted[self.records[i].key] for i in rows]
        new = self.missing(list(wanted.values()))
        given = [r for r in new if vectors and r.key in vectors]
        if given:
            index.add(np.stack([vectors[r.key] for r in given]).astype(np.float32))
            if on_batch:
                on_batch(len(given))
        new = given + [r for r in new if not (vectors and r.key in vectors)]
        for i in range(len(given), len(new), batch_size):
            batch = new[i:i + batch_size]
            index.add(embedder.embed([r.text for r in batch], batch_size))
            if on_batch:
                on_batch(len(batch))
        return ChunkIndex(kept + new, index, self.embedder)

    def search(self, embedder: Embedder, question: str, k: int) -> list[Hit]:
        if embedder.dim != self.faiss_index.d:
            raise ValueError(f"embedder {embedder.name} gives {embedder.dim}-d vectors; the index holds {self.faiss_index.d}-d "
                             f"ones from {self.embedder}")
        scores, rows = self.faiss_index.search(embedder.embed([question]), min(k, len(self.records)))
        return [Hit(self.records[row], float(s)) for s, row in zip(scores[0], rows[0]) if row >= 0]

    def save(self, folder: Path) -> None:
        import faiss

        write_atomic(folder / "index.faiss", faiss.serialize_index(self.faiss_index).tobytes())
        meta = {"embedder": self.embedder, "dim": self.faiss_index.d, "ids": [r.id for r in self.records],
                "keys": [r.key for r in self.records]}
        write_atomic(folder / "index.json", json.dumps(meta).encode())

    @classmethod
    def load(cls, folder: Path, records: dict[str, ChunkRecord]) -> "ChunkIndex":
        """The saved index, its rows matched to the manifest's records by key: rows of chunks the manifest
        no longer records are left out, and its chunks with no row are listed in `behind`."""
        import faiss

        for attempt in range(3):  # a reader between a writer's two renames sees one new file, one old
            meta = json.loads((folder / "index.json").read_text())
            try:
                index = faiss.read_index(str(folder / "index.faiss"))
            except RuntimeError as exc:
                raise ValueError(f"{folder / 'index.faiss'} is unreadable ({str(exc).strip().splitlines()[-1]})") from None
            if index.ntotal == len(meta["ids"]):
                break
            time.sleep(0.1)
        else:
            raise ValueError(f"{folder}: index.faiss holds {index.ntotal} rows, index.json names {len(meta['ids'])}: "
                             "run `kvblend precompute` again to rebuild the index")
        by_key = first_per_key(list(records.values()))
        keys = meta.get("keys") or [records[i].key if i in records else None for i in meta["ids"]]
        rows = [i for i, key in enumerate(keys) if key in by_key]
        if len(rows) < index.ntotal:
            log.warning("%s: %d indexed chunks are no longer in the manifest: left out", folder, index.ntotal - len(rows))
            kept = faiss.IndexFlatIP(index.d)
            if rows:
                kept.add(index.reconstruct_n(0, index.ntotal)[rows])
            index = kept
        loaded = cls([by_key[keys[i]] for i in rows], index, meta["embedder"])
        loaded.behind = loaded.missing(list(records.values()))
        return loaded

