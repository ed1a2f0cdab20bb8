"""The one seam between `KVBlend` and a decoding engine.

`KVBlend` plans prompts, looks chunks up and blends; an engine takes a batch of (chunks, question)
requests and turns them into tokens, using `KVBlend.prefill` for the methods it runs through
kvblend's own prefill. `KVBlend` builds the results (answer text, stats) from the engine's events
in one place, so every engine answers the same way.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from kvblend.config import BlendConfig
from kvblend.engines.sampling import Sampling
from kvblend.results import TokenEvent

Request = tuple[list[str], str]  # (chunks in prompt order, question)


class Engine(Protocol):
    methods: tuple[str, ...]  # the methods `run` accepts

    def run(self, requests: Sequence[Request], max_new_tokens: int, method: str, sampling: Sampling,
            config: BlendConfig | None, keep_prefill: bool = False) -> Iterator[TokenEvent]:
        """Answer the requests; yield each one's new tokens as they come (first token first)."""
        ...

    def warm(self, texts: Iterable[str]) -> None:
        """Called after `KVBlend.precompute` stored these chunks (an engine cache may want them too)."""
        ...

    def settle(self) -> None:
        """Return once the engine is idle, so the next timed request does not pay for the last one."""
        ...

    def close(self) -> None:
        ...
