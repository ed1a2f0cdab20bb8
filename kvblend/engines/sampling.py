"""How the next token is picked from logits: greedy, or temperature with nucleus (top-p) cut."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling parameters: temperature={self.temperature}, top_p={self.top_p}")

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            cut = sorted_p.cumsum(0) - sorted_p >= self.top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=generator))
