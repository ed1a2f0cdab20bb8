"""What both framework adapters do with a KVBlend: make sure chunks are cached, stream text."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from kvblend.api import KVBlend


def ensure_cached(kb: KVBlend, texts: Sequence[str]) -> list[dict]:
    """Precompute the texts' KV where the store lacks it; per text: {"key", "hit", "tokens"}.

    "hit" is True when a valid cache was already stored (nothing had to be encoded).
    """
    outcomes: list[tuple[int, bool]] = []
    keys = kb.precompute(texts, on_chunk=lambda n, computed: outcomes.append((n, computed)))
    return [{"key": key, "hit": not computed, "tokens": n} for key, (n, computed) in zip(keys, outcomes)]


def stream_text(kb: KVBlend, token_ids: Iterable[int]) -> Iterator[str]:
    """Turn generated token ids into text pieces; a piece is held back while it ends mid-character."""
    ids: list[int] = []
    sent = ""
    for token in token_ids:
        if token in kb.stop_ids:
            continue
        ids.append(token)
        text = kb.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
        sent = text
