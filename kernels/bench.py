"""Kernel benchmark: achieved GB/s (memory-bound kernels) and TFLOP/s (attention) of the Triton
kernels (and, on CPU, the C++ attention kernel) beside their torch references, in one run,
against the device's peak.

Default sizes are Llama-3-8B's (32 heads, 8 KV heads, head_dim 128) at 4k–32k prompt tokens with
r = 0.15 of them selected. On CPU it is a smoke run at 256 tokens: torch and the C++ attention
kernel (backend auto), plus the Triton kernels when TRITON_INTERPRET=1 (whose figures measure
the interpreter, not a kernel).

    python -m kvblend.kernels.bench [--device cuda] [--tokens 4096 32768] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from kvblend.kernels import kv_deviation, plan_attention, rope_realign, scatter_rows, selected_attention
from kvblend.kernels import cpu_library
from kvblend.kernels.dispatch import triton_available

# name fragment → (memory bytes/s, dense fp16/bf16 tensor FLOP/s); the first fragment found wins
PEAKS = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),
    ("A100-SXM4-80GB", 2.04e12, 312e12),
    ("A100", 1.555e12, 312e12),
]


def device_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(bytes/s, FLOP/s) of a known GPU; FLOP/s only for 16-bit inputs (tensor-core peak)."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for fragment, bandwidth, flops in PEAKS:
        if fragment in name:
            return bandwidth, flops if dtype in (torch.float16, torch.bfloat16) else None
    return None, None


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds per call; on CUDA Triton's do_bench (warm-up, L2 flushed between calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def selected_positions(n: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """ceil(ratio·n) sorted positions, always including the last (the question's end is fresh)."""
    s = max(1, math.ceil(ratio * n))
    rest = torch.randperm(n - 1, generator=generator)[: s - 1].sort().values
    return torch.cat([rest, torch.tensor([n - 1])])


def kernel_cases(n: int, ratio: float, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> list[tuple[str, str, float, Callable[[str], object]]]:
    """(kernel, metric, bytes or FLOPs per call, run(backend)) for one prompt length."""
    g = torch.Generator().manual_seed(0)
    b = torch.empty(0, dtype=dtype).element_size()

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    pos = selected_positions(n, ratio, g).to(device)
    s = pos.numel()
    k, v, buffer = rand(kv_heads, n, head_dim), rand(kv_heads, n, head_dim), rand(kv_heads, n, head_dim)
    cos, sin, all_pos = rand(n, head_dim), rand(n, head_dim), torch.arange(n, device=device)
    q, rows = rand(heads, s, head_dim), rand(kv_heads, s, head_dim)
    plan = plan_attention(pos, n, heads // kv_heads)  # built once per request, outside the timing
    return [
        ("rope_realign", "GB/s", 2 * kv_heads * n * head_dim * b + 2 * n * head_dim * b + 8 * n,
         lambda be: rope_realign(k, cos, sin, all_pos, out=buffer, backend=be)),
        ("kv_deviation", "GB/s", 2 * kv_heads * n * head_dim * b + 4 * n,
         lambda be: kv_deviation(k, v, backend=be)),
        ("scatter_rows", "GB/s", 2 * kv_heads * s * head_dim * b + 8 * s,
         lambda be: scatter_rows(rows, buffer, pos, backend=be)),
        ("selected_attention", "TFLOP/s", 4 * heads * head_dim * float((pos + 1).sum()),
         lambda be: selected_attention(q, k, v, plan, head_dim**-0.5, backend=be)),
    ]


@torch.inference_mode()
def bench_kernels(
    device: str | torch.device = "cuda",
    tokens: Sequence[int] | None = None,
    ratio: float = 0.15,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype | None = None,
    repeats: int = 5,
    backends: Sequence[str] | None = None,
) -> list[dict]:
    """One row per (kernel, tokens, backend): ms, achieved GB/s or TFLOP/s, and % of the device's peak.

    tokens defaults to 4k/16k/32k on CUDA and 256 on CPU; dtype to bf16 on CUDA and fp32 on CPU;
    backends to torch plus triton wherever Triton can run (CUDA, or CPU under TRITON_INTERPRET=1),
    plus auto on CPU in fp32 (the C++ attention kernel).
    `repeats` applies to CPU timing (CUDA uses do_bench's own).
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    tokens = tokens or ((4096, 16384, 32768) if on_cuda else (256,))
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    if backends is None:
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        backends = ("torch", "triton") if triton_available() and (on_cuda or interpreting) else ("torch",)
        if not on_cuda and dtype == torch.float32 and cpu_library.available():
            backends += ("auto",)  # selected_attention's C++ kernel; the other kernels are torch there
    peak_bytes, peak_flops = device_peaks(device, dtype)
    rows = []
    for n in tokens:
        for kernel, metric, work, run in kernel_cases(n, ratio, heads, kv_heads, head_dim, dtype, device):
            peak = peak_flops if metric == "TFLOP/s" else peak_bytes
            for backend in backends:
                ms = time_ms(lambda: run(backend), device, repeats)
                value = work / (ms * 1e-3) / (1e12 if metric == "TFLOP/s" else 1e9)
                rows.append(dict(
                    kernel=kernel, tokens=n, backend=backend, dtype=str(dtype).removeprefix("torch."), ms=ms, metric=metric, value=value,
                    pct_of_peak=None if peak is None else 100 * work / (ms * 1e-3) / peak,
                ))
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per (kernel, tokens) with each backend's ms, achieved rate and % of peak side by side."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    head = f"{'kernel':<20}{'tokens':>7}{'unit':>9}" + "".join(f"{b + ' ms':>14}{b + ' rate':>14}{'%peak':>7}" for b in backends)
    lines = [head]
    for kernel, n in dict.fromkeys((r["kernel"], r["tokens"]) for r in rows):
        same = {r["backend"]: r for r in rows if r["kernel"] == kernel and r["tokens"] == n}
        line = f"{kernel:<20}{n:>7}{same[backends[0]]['metric']:>9}"
        for b in backends:
            r = same[b]
            pct = "-" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.0f}"
            line += f"{r['ms']:>14.3f}{r['value']:>14.4g}{pct:>7}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run; no peak figures)"
    rows = bench_kernels(device, args.tokens, args.ratio, dtype=dtype, repeats=args.repeats)
    print(f"{name}: Llama-3-8B shapes (32 heads, 8 KV heads, head_dim 128), {rows[0]['dtype']}, r={args.ratio}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
