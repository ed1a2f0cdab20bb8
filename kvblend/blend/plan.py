"""Prompt planning: turn (chunks, question) into segments whose chunks stay cacheable.

The chat template is rendered once around a sentinel and split into a head and a tail, so each
chunk is tokenized alone (exactly as it was precomputed) wherever it lands in the prompt:

    [template head] [chunk 1] [sep] [chunk 2] ... [sep] [chunk n] [sep + question + template tail]
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

_SENTINEL = "\u2063KVBLEND\u2063"


@dataclass
class Segment:
    """A run of prompt tokens; `chunk` is the index of the chunk it holds, or None if fresh."""

    ids: list[int]
    chunk: int | None = None


@dataclass
class Prompt:
    segments: list[Segment]

    @property
    def ids(self) -> list[int]:
        return [t for s in self.segments for t in s.ids]

    def starts(self) -> list[int]:
        out, pos = [], 0
        for s in self.segments:
            out.append(pos)
            pos += len(s.ids)
        return out


class PromptBuilder:
    """Builds segment lists with the tokenizer's chat template (if it has one)."""

    def __init__(self, tokenizer, separator: str = "\n\n", use_chat_template: bool = True, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self._encoded = functools.lru_cache(maxsize=4096)(self._tokenize)
        self.separator = separator
        self.head, self.tail = "", ""
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": _SENTINEL}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            self.head, self.tail = rendered.split(_SENTINEL)
        elif tokenizer.bos_token:
            self.head = tokenizer.bos_token

    def encode(self, text: str) -> list[int]:
        """Token ids of text alone, without special tokens added (templates carry their own).

        Remembered per text: the same chunks come back request after request (that is why they
        are cached), and tokenizing them again would add to every blended request's TTFT."""
        return list(self._encoded(text))

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, chunks: list[str], question: str) -> Prompt:
        if not chunks:
            raise ValueError("no chunks given: pass at least one document chunk")
        for i, c in enumerate(chunks):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"chunk {i} is empty")
        segments = [Segment(self.encode(self.head))] if self.head else []
        sep = self.encode(self.separator) if self.separator else []
        for i, c in enumerate(chunks):
            if i and sep:
                segments.append(Segment(list(sep)))
            segments.append(Segment(self.encode(c), chunk=i))
        segments.append(Segment(self.encode(self.separator + question + self.tail)))
        return Prompt(segments)
