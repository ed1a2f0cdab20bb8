"""Splitting documents into chunks of at most N model tokens, on sentence boundaries where possible.

The boundaries come from `semantic-text-splitter` (Unicode sentence segmentation, falling back to
words then characters), measured with the LLM's own tokenizer, so a chunk never exceeds the
budget its KV cache was sized for.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvblend.corpus.reader import Document


@dataclass(frozen=True)
class Chunk:
    """A chunk of a document: text[start:end] of `source` (character offsets), whitespace-trimmed."""

    source: str
    start: int
    end: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.source}@{self.start}-{self.end}"


class ChunkSplitter:
    def __init__(self, tokenizer, chunk_tokens: int = 512):
        """tokenizer: the LLM's Hugging Face (fast) tokenizer."""
        from semantic_text_splitter import TextSplitter

        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; chunking needs one")
        self.chunk_tokens = chunk_tokens
        self._splitter = TextSplitter.from_huggingface_tokenizer(backend, chunk_tokens, trim=True)

    def split(self, document: Document) -> list[Chunk]:
        return [Chunk(document.source, start, start + len(text), text)
                for start, text in self._splitter.chunk_indices(document.text) if text.strip()]
