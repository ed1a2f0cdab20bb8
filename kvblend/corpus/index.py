"""A faiss index over chunk embeddings, saved beside the manifest it points into.

Identical chunk texts (same key) are indexed once, so the top-k never repeats a passage.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvblend.corpus.atomic import write_atomic
from kvblend.corpus.embed import Embedder
from kvblend.corpus.manifest import ChunkRecord


@dataclass
class Hit:
    record: ChunkRecord
    score: float


class ChunkIndex:
    """Inner-product search over unit vectors (cosine), row i ↔ records[i]."""

    def __init__(self, records: list[ChunkRecord], faiss_index, embedder: str):
        self.records = records
        self.faiss_index = faiss_index
        self.embedder = embedder

    @classmethod
    def build(cls, records: Sequence[ChunkRecord], embedder: Embedder, batch_size: int = 32,
              on_batch: Callable[[int], None] | None = None) -> "ChunkIndex":
        import faiss

        unique = list({r.key: r for r in reversed(records)}.values())[::-1]  # first record per key
        index = faiss.IndexFlatIP(embedder.dim)
        for i in range(0, len(unique), batch_size):
            batch = unique[i:i + batch_size]
            index.add(embedder.embed([r.text for r in batch], batch_size))
            if on_batch:
                on_batch(len(batch))
        return cls(unique, index, embedder.name)

    def search(self, embedder: Embedder, question: str, k: int) -> list[Hit]:
        if embedder.dim != self.faiss_index.d:
            raise ValueError(f"embedder {embedder.name} gives {embedder.dim}-d vectors; the index holds {self.faiss_index.d}-d "
                             f"ones from {self.embedder}")
        scores, rows = self.faiss_index.search(embedder.embed([question]), min(k, len(self.records)))
        return [Hit(self.records[row], float(s)) for s, row in zip(scores[0], rows[0]) if row >= 0]

    def save(self, folder: Path) -> None:
        import faiss

        write_atomic(folder / "index.faiss", faiss.serialize_index(self.faiss_index).tobytes())
        meta = {"embedder": self.embedder, "dim": self.faiss_index.d, "ids": [r.id for r in self.records]}
        write_atomic(folder / "index.json", json.dumps(meta).encode())

    @classmethod
    def load(cls, folder: Path, records: dict[str, ChunkRecord]) -> "ChunkIndex":
        import faiss

        meta = json.loads((folder / "index.json").read_text())
        index = faiss.read_index(str(folder / "index.faiss"))
        missing = [i for i in meta["ids"] if i not in records]
        if missing or index.ntotal != len(meta["ids"]):
            raise ValueError(f"{folder}: index and manifest disagree ({len(missing)} unknown chunks); re-run `kvblend precompute`")
        return cls([records[i] for i in meta["ids"]], index, meta["embedder"])

