"""Corpus precompute: documents → chunks → KV in the store, one manifest line per stored chunk."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

from kvblend.corpus.landing import Landing
from kvblend.corpus.manifest import ChunkRecord, Manifest
from kvblend.corpus.reader import Document
from kvblend.corpus.splitter import Chunk, ChunkSplitter
from kvblend.store.codecs import get_codec
from kvblend.store.format import DTYPES


def kv_bytes_per_token(config, dtype: str, codec: str = "raw") -> int:
    """Stored KV bytes per token, from a Hugging Face model config: raw is 2 (K and V) · layers ·
    kv_heads · head_dim · dtype bytes; fp8 / int8 take a byte a value plus per-token scales; int4
    half a byte plus a float16 scale per 32 values (keys' scales span 32 tokens: sized over 1024)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tokens = 1024
    return config.num_hidden_layers * get_codec(codec).layer_nbytes((kv_heads, tokens, head_dim), DTYPES[dtype]) // tokens


@dataclass
class PlannedChunk:
    chunk: Chunk
    tokens: int


def plan_chunks(documents: list[Document], splitter: ChunkSplitter, tokenizer) -> list[PlannedChunk]:
    """Every chunk with its token count (as the chunk is encoded: alone, no special tokens)."""
    chunks = [c for doc in documents for c in splitter.split(doc)]
    counts = tokenizer([c.text for c in chunks], add_special_tokens=False)["input_ids"] if chunks else []
    return [PlannedChunk(c, len(ids)) for c, ids in zip(chunks, counts)]


@dataclass(frozen=True)
class CacheStatus:
    key: str
    hit: bool  # a valid cache was already stored: nothing had to be encoded
    tokens: int


def ensure_cached(kb, texts: list[str]) -> list[CacheStatus]:
    """Encode the texts' KV where kb's store lacks a valid cache; says per text whether it was there."""
    outcomes: list[tuple[int, bool]] = []
    keys = kb.precompute(texts, on_chunk=lambda n, computed: outcomes.append((n, computed)))
    return [CacheStatus(key, not computed, n) for key, (n, computed) in zip(keys, outcomes)]


@dataclass
class PrecomputeReport:
    encoded: int = 0  # encoded and stored in every durable tier
    skipped: int = 0  # already stored
    tokens_encoded: int = 0
    failed: list[tuple[ChunkRecord, dict[str, str]]] = field(default_factory=list)  # not stored: {tier: error}
    vectors: dict = field(default_factory=dict)  # key → embedding, when the encoders embedded too (Ray actors)

    def failure_reasons(self) -> Counter[str]:
        """'tier: error' → how many chunks failed so."""
        return Counter(f"{tier} tier: {why}" for _, failures in self.failed for tier, why in failures.items())


def store_chunks(kb, planned: list[PlannedChunk], manifest: Manifest,
                 on_chunk: Callable[[PlannedChunk, bool], None] | None = None) -> PrecomputeReport:
    """Encode each chunk missing (or damaged) in kb's store and record it; valid stored ones are skipped.

    A chunk's manifest line is written only once its object is in every durable tier of the store
    (the background writes report back), so neither a kill nor a failed write leaves the manifest
    claiming a chunk the store lacks; chunks whose writes failed are in the report, not the manifest.
    `on_chunk(item, computed)` follows the encoding, for progress. An OSError from the manifest
    itself (a full disk) ends the run: what was stored is found again by the next run.
    """
    report = PrecomputeReport()

    def record(done: list[tuple[tuple[ChunkRecord, bool], dict[str, str]]]) -> None:
        for (rec, computed), failures in done:
            if failures:
                report.failed.append((rec, failures))
                continue
            manifest.append(rec)
            if computed:
                report.encoded += 1
                report.tokens_encoded += rec.tokens
            else:
                report.skipped += 1

    with Landing(kb.store) as landing:
        try:
            for item in planned:
                [status] = ensure_cached(kb, [item.chunk.text])
                c = item.chunk
                rec = ChunkRecord(id=c.id, source=c.source, start=c.start, end=c.end, key=status.key, tokens=status.tokens, text=c.text)
                if status.hit:
                    landing.found(status.key, (rec, False))
                else:
                    landing.wrote(status.key, (rec, True))
                if on_chunk:
                    on_chunk(item, not status.hit)
                record(landing.ready())
        except BaseException:
            with suppress(OSError):  # on the way out (Ctrl-C, a full disk): record what did land
                record(landing.finish())
            raise
        record(landing.finish())
    return report
