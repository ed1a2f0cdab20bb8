"""The quality-vs-speed frontier: blend at several recompute ratios beside full, reuse (and vLLM's
prefix caching), so a user picks a ratio from a curve measured on their own data."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from kvblend.eval.methods import MethodSpec, split_top_level


def frontier_methods(ratios: Iterable[float], extra: str = "", with_prefix: bool = False) -> str:
    """The `--methods` list of a frontier run: full, reuse, (prefix,) blend at each ratio, then `extra`'s variants."""
    names = ["full", "reuse"] + (["prefix"] if with_prefix else [])
    names += [f"blend[recompute_ratio={r:g}]" for r in ratios]
    return ",".join(names + [m for m in extra.split(",") if m and m not in names and m not in ("full", "reuse", "blend", "prefix")])


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--ratios must be a comma list of numbers, not {text!r}") from None
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        raise ValueError(f"--ratios must be numbers from 0 to 1, not {text!r}")
    return sorted(set(ratios))


def _label(spec: MethodSpec) -> str:
    """"r=R" for a point of a ratio sweep (a blend whose overrides are its ratio and at most its
    selection), else the method's name."""
    keys = {item.partition("=")[0].strip() for item in split_top_level(spec.name.partition("[")[2][:-1])}
    if spec.method == "blend" and spec.config is not None and "recompute_ratio" in keys and keys <= {"recompute_ratio", "selection"}:
        return f"r={spec.config.recompute_ratio:g}"
    return spec.name


def plot_frontier(summary: dict[str, dict], specs: Sequence[MethodSpec], path: Path, title: str) -> None:
    """Two panels against TTFT speed-up over full prefill: teacher-forced KL (lower is better) and
    first-token agreement with full prefill, each with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, 2, figsize=(11, 4.2))
    sweep = [s for s in specs if _label(s).startswith("r=")]
    lines: dict[str, list[MethodSpec]] = {}  # one line per ranking swept
    for spec in sweep:
        lines.setdefault(spec.config.selection, []).append(spec)
    for ax, key, name in ((panels[0], "kl_tf", "KL vs full prefill (teacher-forced, nats)"),
                          (panels[1], "first_token_agree", "first-token agreement with full prefill")):
        def point(spec: MethodSpec) -> tuple[float, float, tuple[float, float]]:
            row = summary[spec.name]
            lo, hi = row.get(f"{key}_ci") or (math.nan, math.nan)
            return row["speedup_vs_full"], row[key], (row[key] - lo, hi - row[key])

        for selection, members in lines.items():
            xs, ys, errs = zip(*(point(s) for s in members))
            label = "blend" if len(lines) == 1 else f"blend, selection={selection}"
            ax.errorbar(xs, ys, yerr=list(zip(*errs)), marker="o", capsize=3, label=label)
            for spec, x, y in zip(members, xs, ys):
                ax.annotate(_label(spec), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for spec in specs:
            if spec not in sweep and not spec.oracle:  # an oracle has no TTFT (it needs full prefill)
                x, y, err = point(spec)
                ax.errorbar([x], [y], yerr=[[err[0]], [err[1]]], marker="s", capsize=3, linestyle="none", label=spec.name)
        ax.set_xlabel("TTFT speed-up vs full prefill (x)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
