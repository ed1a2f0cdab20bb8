"""One markdown table from `kvblend eval --json` files run on the same records: per method, kl_tf
and first-token agreement with 95% bootstrap intervals, kl_tf divided by a baseline method's
(paired per record, ratio of means, with its bootstrap interval) and the TTFT speed-up.

A run given as `a.json,b.json` is the records of both (e.g. records 0-19 and 20-39, run apart);
`--plot` draws the frontier of the last run, as `kvblend eval --frontier` does.

    python scripts/quality_table.py bos.json primed_0.json,primed_1.json --baseline bos.json:reuse --plot frontier.png
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from kvblend.config import BlendConfig
from kvblend.eval.frontier import plot_frontier
from kvblend.eval.methods import parse_methods
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
    parser.add_argument("--plot", type=Path, help="draw the last run's frontier here")
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
        config, report = list(runs.values())[-1]
        specs = parse_methods(",".join(report.methods), BlendConfig())
        records = len(report.methods["full"])
        plot_frontier(report.summary(), specs, args.plot, f"{config['dataset']}: {records} records, {config['kvblend']['model']}")


if __name__ == "__main__":
    main()
