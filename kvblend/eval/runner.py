"""The eval loop: every method on every record, interleaved, against full prefill.

Per record the chunks are precomputed first (not timed), then each method prefills (timed: its
TTFT), decodes greedily (answer F1, token agreement with full) and is teacher-forced along full's
greedy continuation (KL over the first positions: steadier than first-token KL alone).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvblend.api import KVBlend
from kvblend.engines.hf import HFEngine, decode, step_logits, truncate
from kvblend.engines.sampling import Sampling
from kvblend.eval.datasets import Record
from kvblend.eval.methods import MethodSpec
from kvblend.eval.metrics import bootstrap_interval, f1_score, kl_divergence, token_agreement
from kvblend.eval.oracle import oracle_ranking
from kvblend.results import GenerateResult, Prefill


@dataclass
class MethodRow:
    """One method on one record."""

    ttft_s: float
    kl_first: float
    kl_tf: float
    first_agree: bool
    token_agree: float
    f1: float | None
    recompute_share: float


@dataclass
class EvalReport:
    methods: dict[str, list[MethodRow]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict]:
        """Per method: means over records, with 95% bootstrap intervals (`*_ci`) for the quality columns."""
        full = self.methods["full"]
        out = {}
        for name, rows in self.methods.items():
            f1s = [r.f1 for r in rows if r.f1 is not None]
            out[name] = {
                "f1": statistics.fmean(f1s) if f1s else None,
                "f1_ci": bootstrap_interval(f1s) if f1s else None,
                "first_token_agree": statistics.fmean(r.first_agree for r in rows),
                "first_token_agree_ci": bootstrap_interval([r.first_agree for r in rows]),
                "token_agree": statistics.fmean(r.token_agree for r in rows),
                "kl_first": statistics.fmean(r.kl_first for r in rows),
                "kl_tf": statistics.fmean(r.kl_tf for r in rows),
                "kl_tf_ci": bootstrap_interval([r.kl_tf for r in rows]),
                "ttft_median_s": statistics.median(r.ttft_s for r in rows),
                # paired per record, so drift of the machine's speed cancels out
                "speedup_vs_full": statistics.median(f.ttft_s / r.ttft_s for f, r in zip(full, rows)),
                "recompute_share": statistics.fmean(r.recompute_share for r in rows),
                "records": len(rows),
            }
        return out


def _forced_logits(kb: KVBlend, pre, forced: list[int]) -> torch.Tensor:
    """Logits at the first len(forced)+1 answer positions, feeding `forced` after the prompt."""
    n = pre.ids.numel()
    truncate(pre.cache, n)
    rows = [pre.logits[None]]
    if forced:
        rows.append(step_logits(kb.model, pre.cache, forced, n))
    return torch.cat(rows)


def _oracle(kb: KVBlend, chunks: list[str], question: str, spec: MethodSpec, full: Prefill,
            reference_logits: torch.Tensor, forced: list[int], steps: int) -> GenerateResult:
    """A blend ranked by an oracle (kvblend.eval.oracle), decoded greedily; untimed (it runs full prefill's work)."""
    reuse = kb.prefill(chunks, question, "reuse")
    ranking = oracle_ranking(spec.oracle, kb.model, reuse.ids, full.cache, reuse.cache, reference_logits, forced)
    pre = kb.prefill(chunks, question, "blend", spec.config, ranking=ranking)
    tokens = list(decode(kb.model, pre.cache, pre.logits, pre.ids.numel(), steps, Sampling(), kb.stop_ids))
    pre.stats.ttft_s = math.nan
    return GenerateResult(kb.answer_text(tokens), tokens, math.nan, pre.stats, pre)


def evaluate(
    kb: KVBlend,
    records: list[Record],
    methods: list[MethodSpec],
    max_new_tokens: int = 32,
    tf_tokens: int = 16,
    on_record: Callable[[int, EvalReport], None] | None = None,
    shuffle_seed: int | None = None,
) -> EvalReport:
    """Run `methods` (the first must be full) on `records`; returns per-record rows per method.

    With `shuffle_seed`, chunks are precomputed in dataset order and every method is asked them in
    one shuffled order per record, so cached prefixes rarely match. Methods decode on `kb.engine`;
    KL needs the prefill's logits, so it is NaN on an engine that keeps none (vLLM returns no full
    distributions). `on_record(index, report so far)` runs after each record.
    """
    if methods[0].method != "full":
        raise ValueError("the first method must be full (the reference)")
    if any(m.oracle for m in methods) and not isinstance(kb.engine, HFEngine):
        raise ValueError("oracle methods run on the transformers engine (--engine hf)")
    report = EvalReport({m.name: [] for m in methods})
    for spec in methods:  # warm-up: first calls pay one-off allocation and kernel selection costs
        if spec.oracle:
            continue
        kb.precompute(records[0].chunks)
        kb.generate(records[0].chunks, records[0].question, 1, spec.method, config=spec.config)
    for idx, record in enumerate(records):
        kb.precompute(record.chunks)
        chunks = record.chunks_in_order(idx, shuffle_seed)
        ref_logits: torch.Tensor | None = None
        ref_tokens: list[int] = []
        ref_prefill: Prefill | None = None
        for spec in methods:
            steps = max(max_new_tokens, tf_tokens) if spec.method == "full" else max_new_tokens
            if spec.oracle:
                result = _oracle(kb, chunks, record.question, spec, ref_prefill, ref_logits, ref_tokens[: tf_tokens - 1], steps)
            else:
                kb.engine.settle()  # each timed request starts on an idle engine
                result = kb.generate(chunks, record.question, steps, spec.method, config=spec.config, keep_prefill=True)
            stats, tokens, pre = result.stats, result.token_ids, result.prefill
            if spec.method == "full":
                ref_tokens, ref_prefill = tokens, pre
            kl_first = kl_tf = math.nan
            if pre is not None:
                logits = _forced_logits(kb, pre, ref_tokens[: tf_tokens - 1])
                if ref_logits is None:
                    ref_logits = logits
                kls = kl_divergence(ref_logits, logits)
                kl_first, kl_tf = float(kls[0]), float(kls.mean())
            answer_tokens = tokens[:max_new_tokens]
            report.methods[spec.name].append(
                MethodRow(
                    ttft_s=stats.ttft_s,
                    kl_first=kl_first,
                    kl_tf=kl_tf,
                    first_agree=tokens[0] == ref_tokens[0],
                    token_agree=token_agreement(ref_tokens[:max_new_tokens], answer_tokens),
                    f1=f1_score(kb.answer_text(answer_tokens), record.answers) if record.answers else None,
                    recompute_share=stats.tokens_recomputed / max(1, stats.tokens_cached),
                )
            )
        if on_record:
            on_record(idx, report)
    return report
