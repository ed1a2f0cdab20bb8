"""TTFT benchmark: full prefill vs full reuse vs blend at several ratios, in one interleaved run.

Contexts are cut from real text (the MuSiQue passages shipped with kvblend, or a folder holding
another musique_dev.json) into chunks of a fixed token count, so every method sees the same prompt.
Speed-ups are medians of per-repeat ratios, measured side by side, because a machine's absolute
speed drifts between runs; each is printed beside the compute bound 1 / (c/L + (1 - c/L)·r)
(docs/design.md, "Performance model").
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvblend.api import KVBlend

QUESTION = "\n\nSummarise the passages above in one sentence.\nAnswer:"


def corpus_text(datasets: Path | None = None) -> str:
    """Real text to cut contexts from: the passages of `datasets`/musique_dev.json (default: the
    bundled MuSiQue records), else the bundled sample prompt repeated."""
    from kvblend.eval.datasets import bundled_dir

    musique = Path(datasets or bundled_dir()) / "musique_dev.json"
    if musique.exists():
        records = json.loads(musique.read_text())
        return "\n\n".join(c["text"] for r in records for c in r["ctxs"])
    sample = json.loads(resources.files("kvblend").joinpath("data/sample.json").read_text())
    return "\n\n".join(sample[str(i)] for i in range(sample["chunk_num"])) * 8


def make_chunks(kb: KVBlend, text: str, context_tokens: int, chunk_tokens: int) -> list[str]:
    ids = kb.builder.encode(text)
    need = context_tokens
    if len(ids) < need:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than the {need} asked for")
    return [kb.tokenizer.decode(ids[s : s + chunk_tokens]) for s in range(0, need, chunk_tokens)]


def compute_bound(ratio: float, full_layers: int, layers: int) -> float:
    """The blend's compute-bound speed-up over full prefill (docs/design.md, "Performance model")."""
    share = full_layers / layers
    return 1.0 / (share + (1 - share) * ratio)


@dataclass
class BenchRow:
    context_tokens: int
    method: str
    ratio: float | None
    ttft_median_s: float
    speedup: float
    bound: float | None


def bench_ttft(kb: KVBlend, context_tokens: list[int], chunk_tokens: int, ratios: list[float], repeats: int = 3,
               datasets: Path | None = None, on_step=None) -> list[BenchRow]:
    text = corpus_text(datasets)
    rows = []
    full_layers = (kb.config.blend.layers or [0])[0]
    for n in context_tokens:
        chunks = make_chunks(kb, text, n, chunk_tokens)
        kb.precompute(chunks)
        methods = [("full", None), ("reuse", None)] + [("blend", r) for r in ratios]
        times: dict[tuple, list[float]] = {m: [] for m in methods}
        for rep in range(repeats + 1):  # the first round warms up and is dropped
            for method, r in methods:
                cfg = kb.config.blend.model_copy(update={"recompute_ratio": r}) if r is not None else None
                t = kb.prefill(chunks, QUESTION, method, config=cfg).stats.ttft_s
                if rep:
                    times[(method, r)].append(t)
                if on_step:
                    on_step()
        full = times[("full", None)]
        for (method, r), ts in times.items():
            speedup = statistics.median(f / t for f, t in zip(full, ts))
            bound = compute_bound(r, full_layers, kb.adapter.num_layers) if r is not None else None
            rows.append(BenchRow(n, method, r, statistics.median(ts), speedup, bound))
    return rows


def plot(rows: list[BenchRow], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in sorted({r.context_tokens for r in rows}):
        blend = [r for r in rows if r.context_tokens == n and r.method == "blend"]
        line = ax.plot([r.ratio for r in blend], [r.speedup for r in blend], "o-", label=f"blend, {n} tokens")[0]
        ax.plot([r.ratio for r in blend], [r.bound for r in blend], "--", color=line.get_color(), alpha=0.5)
        reuse = next(r for r in rows if r.context_tokens == n and r.method == "reuse")
        ax.axhline(reuse.speedup, color=line.get_color(), linestyle=":", alpha=0.5)
    ax.set_xlabel("recompute ratio r")
    ax.set_ylabel("TTFT speed-up vs full prefill")
    ax.set_title("measured (solid), compute bound (dashed), full reuse (dotted)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
