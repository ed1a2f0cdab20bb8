"""Streaming generated tokens as text, for the adapters' streaming paths."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from kvblend.api import KVBlend


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
