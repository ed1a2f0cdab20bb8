"""One markdown table from `kvblend eval --json` files run on the same records: per method, kl_tf
and first-token agreement with 95% bootstrap intervals, kl_tf divided by a baseline method's
(paired per record, ratio of means, with its bootstrap interval) and the TTFT speed-up.

A run given as `a.json,b.json` is the records of both (e.g. records 0-19 and 20-39, run apart);
`--plot` draws every run's methods on one frontier, as `kvblend eval --frontier` draws one run's.

    python scripts/quality_table.py bos.json primed_0.json,primed_1.json --baseline bos.json:reuse --plot frontier.png
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from kvblend.config import BlendConfig
from kvblend.eval.frontier import plot_frontier
from kvblend.eval.methods import parse_methods, split_top_level
from kvblend.eval.metrics import bootstrap_interval
from kvblend.eval.runner import EvalReport, MethodRow


def load_run(spec: str) -> tuple[dict, EvalReport]:
    """The config of the first file and every file's records, method by method, in order (the methods
    every file has; a run stopped early keeps the records it finished)."""
    parts = [json.loads(Path(p).read_text()) for p in spec.split(",")]
    report = EvalReport({name: [MethodRow(**row) for part in parts for row in part["records"][name]]
                         for name in parts[0]["records"] if all(name in part["records"] for part in parts)})
    return parts[0]["config"], report


def ratio_interval(values: list[float], base: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(values) / mean(base) over the same records, with a paired percentile bootstrap interval."""
    v, b = torch.tensor(values, dtype=torch.float64), torch.tensor(base, dtype=torch.float64)
    picks = torch.randint(0, v.numel(), (resamples, v.numel()), generator=torch.Generator().manual_seed(seed))
    ratios = v[picks].mean(1) / b[picks].mean(1)
    return float(v.mean() / b.mean()), float(ratios.quantile(0.025)), float(ratios.quantile(0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="kvblend eval --json files over the same records (a,b: one run in parts)")
    parser.add_argument("--baseline", required=True, help="RUN:METHOD whose kl_tf the ratio column divides by")
    parser.add_argument("--plot", type=Path, help="draw every run's methods on one frontier here")
    parser.add_argument("--plot-methods", help="comma list: draw only these methods (default: all)")
    args = parser.parse_args()
    runs = {spec: load_run(spec) for spec in args.runs}
    base_run, _, base_method = args.baseline.rpartition(":")
    base = [r.kl_tf for r in runs[base_run][1].methods[base_method]]
    print("| chunk context | method | kl_tf [95% CI] | kl_tf / baseline [95% CI] | 1st-token agree [95% CI] | speed-up vs full |")
    print("|---|---|---|---|---|---|")
    for config, report in runs.values():
        context = config["kvblend"]["blend"]["chunk_context"]
        summary = report.summary()
        for name, rows in report.methods.items():
            if name == "full":
                continue
            kl = [r.kl_tf for r in rows]
            agree = [float(r.first_agree) for r in rows]
            if len(kl) != len(base):
                raise SystemExit(f"{name}: {len(kl)} records, the baseline {len(base)}")
            lo, hi = bootstrap_interval(kl)
            alo, ahi = bootstrap_interval(agree)
            ratio, rlo, rhi = ratio_interval(kl, base)
            speed = summary[name]["speedup_vs_full"]
            speed_text = "-" if math.isnan(speed) else f"{speed:.2f}x"
            print(f"| {context} | `{name}` | {sum(kl) / len(kl):.4f} [{lo:.4f}, {hi:.4f}] | {ratio:.2f} [{rlo:.2f}, {rhi:.2f}] "
                  f"| {sum(agree) / len(agree):.2f} [{alo:.2f}, {ahi:.2f}] | {speed_text} |")
    if args.plot:
        plot_runs(list(runs.values()), args.plot, set(split_top_level(args.plot_methods)) if args.plot_methods else None)


def plot_runs(runs: list[tuple[dict, EvalReport]], path: Path, only: set[str] | None = None) -> None:
    """One frontier of every run's methods, or of those in `only` (each speed-up from its own run):
    a name two runs share is kept once, from the first run, unless their chunk contexts differ (then
    suffixed with it)."""
    summary, specs, contexts = {}, [], {}
    for config, report in runs:
        context = config["kvblend"]["blend"]["chunk_context"]
        rows = report.summary()
        for spec in parse_methods(",".join(report.methods), BlendConfig.model_validate(config["kvblend"]["blend"])):
            name = spec.name
            if only is not None and name not in only:
                continue
            if name in contexts and contexts[name] != context:
                name = f"{name} ({context})"
            if name in summary:
                continue
            contexts.setdefault(spec.name, context)
            summary[name] = rows[spec.name]
            specs.append(replace(spec, name=name))
    config, report = runs[0]
    records = len(report.methods["full"])
    plot_frontier(summary, specs, path, f"{config['dataset']}: {records} records, {config['kvblend']['model']}")

if __name__ == "__main__":
    main()
