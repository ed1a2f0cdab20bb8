"""Corpus tooling: read files, chunk by model tokens, precompute chunk KV, index chunk embeddings."""
from kvblend.corpus.embed import DEFAULT_EMBEDDER, Embedder
from kvblend.corpus.folder import CorpusError, CorpusFolder
from kvblend.corpus.index import ChunkIndex, Hit
from kvblend.corpus.lock import CorpusLocked, PrecomputeLock
from kvblend.corpus.manifest import ChunkRecord, Manifest
from kvblend.corpus.precompute import (CacheStatus, PlannedChunk, PrecomputeReport, ensure_cached, kv_bytes_per_token,
                                       plan_chunks, store_chunks)
from kvblend.corpus.reader import Document, Problem, ReadResult, read_corpus
from kvblend.corpus.splitter import Chunk, ChunkSplitter

__all__ = [
    "DEFAULT_EMBEDDER", "CacheStatus", "Chunk", "ChunkIndex", "ChunkRecord", "ChunkSplitter", "CorpusError", "CorpusFolder",
    "CorpusLocked", "PrecomputeLock",
    "Document", "Embedder", "Hit", "Manifest", "PlannedChunk", "PrecomputeReport", "Problem", "ReadResult",
    "ensure_cached", "kv_bytes_per_token", "plan_chunks", "read_corpus", "store_chunks",
]
