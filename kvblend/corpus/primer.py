"""Choosing a corpus's primer: the passage every chunk is encoded after (chunk_context="primed").

A chunk encoded after a passage of its own corpus has KV closer to what a full prefill computes
where it follows other retrieved passages (docs/benchmarks.md, Blend quality). The primer is the
corpus's most typical passage: the one whose tf-idf vector of model tokens is closest to the
corpus mean, among a deterministic sample of the chunks. No embedding model is needed, so any
precompute can choose it, and the same texts always give the same primer.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

PRIMER_TOKENS = 512  # the primer is cut to this many tokens: it is encoded before every chunk
SAMPLE = 4096  # chunks looked at, evenly spaced through the corpus


def _sample(texts: Sequence[str], n: int) -> list[str]:
    if len(texts) <= n:
        return list(texts)
    step = len(texts) / n
    return [texts[int(i * step)] for i in range(n)]


def choose_primer(texts: Sequence[str], tokenizer, max_tokens: int = PRIMER_TOKENS) -> str:
    """The most typical of `texts` (cut to `max_tokens` tokens), by tf-idf cosine to the corpus mean."""
    candidates = [t.strip() for t in _sample(texts, SAMPLE) if t and t.strip()]
    if not candidates:
        raise ValueError("cannot choose a primer: the corpus has no text")
    token_ids = tokenizer(candidates, add_special_tokens=False)["input_ids"]
    counts = [Counter(ids) for ids in token_ids]
    document_frequency = Counter(token for c in counts for token in c)
    idf = {token: math.log(len(counts) / df) + 1.0 for token, df in document_frequency.items()}
    vectors = []
    for c in counts:
        v = {token: n * idf[token] for token, n in c.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        vectors.append({token: x / norm for token, x in v.items()})
    mean: Counter[int] = Counter()
    for v in vectors:
        mean.update(v)
    best = max(range(len(vectors)), key=lambda i: (sum(x * mean[t] for t, x in vectors[i].items()), -i))
    ids = token_ids[best]
    return candidates[best] if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip()
