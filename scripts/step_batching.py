"""Would one pass over the layers for all of a step's blends beat blending them one after another?

A one-pass batch could share only the row-wise matrix products (QKV projection, output projection,
MLP) between the step's requests; the fused KV, the selection and the attention stay per request.
This blends one MuSiQue prompt (top-6 passages) with stage timings, then times a layer's matrix
products (`LayerwiseModel.qkv`, `attn_out`, `mlp`: the blend's own code) at the row counts one
request has (every prompt token up to the check layer, the recomputed and fresh ones after it)
and at K times those rows, and prints what a one-pass step of K requests could save at most
(docs/vllm.md, "Blends of one step").

    .venv/bin/python scripts/step_batching.py [--requests 2,4,8] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from kvblend import KVBlend
from kvblend.eval.datasets import load_dataset


def per_row_seconds(m, layer: int, rows: int, repeats: int) -> float:
    """Best time per row of one layer's matrix products over `rows` hidden states."""
    h = torch.randn(rows, m.layers[layer].qkv_weight.shape[1], dtype=m.dtype)
    attn = torch.randn(m.num_heads, rows, m.head_dim, dtype=m.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            m.qkv(layer, h)
            m.mlp(layer, m.attn_out(layer, h, attn))
            best = min(best, time.perf_counter() - t)
    return best / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="2,4,8", help="requests per step to compare with one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = load_dataset("musique-dev", top_k=6, limit=1)[0]
    with KVBlend() as kb:
        kb.precompute(record.chunks)
        kb.prefill(record.chunks, record.question, "blend")  # warm-up
        s = kb.prefill(record.chunks, record.question, "blend", profile=True).stats
        m = kb.adapter
        checks = kb.config.blend.layers
        n = s.tokens_total
        after = n - s.tokens_cached + s.tokens_recomputed  # fresh tokens plus the recomputed cached ones
        layers_all = checks[-1] + 1 if checks else 0  # layers that run every token
        rows = [(n, layers_all), (after, m.num_layers - layers_all)]
        products = s.stages_s.get("qkv", 0.0) + s.stages_s.get("mlp", 0.0)  # attn_out runs in the "mlp" stage
        print(f"one blend: {n} tokens, {after} computed after layer {layers_all - 1}; {s.ttft_s:.2f} s, "
              f"of which the row-wise matrix products {products:.2f} s ({products / s.ttft_s:.0%})")
        single = {r: per_row_seconds(m, 0, r, args.repeats) for r, _ in rows}
        print("| requests per step | per-row cost, all tokens | per-row cost, after the check | "
              "step time saved at most |")
        print("|---|---|---|---|")
        for k in map(int, args.requests.split(",")):
            ratios = {r: per_row_seconds(m, 0, k * r, args.repeats) / single[r] for r, _ in rows}
            weight = {r: r * count for r, count in rows}  # the share of the product time each row count takes
            batched = sum(ratios[r] * weight[r] for r in ratios) / sum(weight.values())
            saved = products / s.ttft_s * (1 - batched)
            print(f"| {k} | {ratios[n]:.2f}x | {ratios[after]:.2f}x | {saved:.1%} |")


if __name__ == "__main__":
    main()
