"""Answer and agreement metrics: SQuAD-style F1, first-token and teacher-forced KL, bootstrap intervals."""
from __future__ import annotations

import math
import re
import string
from collections import Counter

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(prediction: str, answers: list[str]) -> float:
    """Token-level F1 of prediction against the best-matching answer."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of [..., vocab] logits, in nats."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    other = torch.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - other)).sum(dim=-1)


def token_agreement(reference: list[int], tokens: list[int]) -> float:
    """Share of the reference's positions where the other sequence has the same token."""
    if not reference:
        return 1.0
    return sum(a == b for a, b in zip(reference, tokens)) / len(reference)


def bootstrap_interval(values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over records (resampled with replacement)."""
    data = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if data.numel() == 0:
        return math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, data.numel(), (resamples, data.numel()), generator=generator)
    means = data[picks].mean(dim=1)
    tail = (1 - level) / 2
    return float(means.quantile(tail)), float(means.quantile(1 - tail))
