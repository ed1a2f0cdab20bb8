"""The C++ selected-query attention kernel for CPU fp32 (cpu_attention.cpp): built on first use
with the machine's C++ compiler, cached under `$KVBLEND_HOME/kernels`, loaded with ctypes.

On SmolLM2-135M's shapes (9 query / 3 KV heads, d = 64, 3,725 keys, 2 threads) it takes 15 ms
where torch's SDPA over kvblend's masked blocks takes 22 for a blend's 630 scattered queries, and
80 ms against SDPA's 93 for a full causal prefill: no mask tensor is read and no key past a
query's position is multiplied. Where it cannot be built (no compiler, a torch without MKL's
sgemm), `available()` is False and the torch path runs, with one warning.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvblend.config import kvblend_home

if TYPE_CHECKING:
    from kvblend.kernels.selected_attention import AttentionPlan

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_attention.cpp")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")  # gcc keeps AVX-512 machines on 256-bit vectors otherwise
TORCH_LIB = Path(torch.__file__).parent / "lib"  # libtorch_cpu exports MKL's sgemm_; the libgomp there is torch's
Q_TILE, K_TILE = 64, 256  # queries (times the GQA group) and keys per tile; tuned on SmolLM2-135M shapes


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, str(SOURCE), "-o", str(built), f"-L{TORCH_LIB}", "-ltorch_cpu", f"-Wl,-rpath,{TORCH_LIB}"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: processes building at once each publish a whole file


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("no C++ compiler found: the blend's CPU attention runs torch's SDPA (slower); install g++")
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, str(TORCH_LIB), torch.__version__, _cpu_flags()]).encode())
    target = kvblend_home() / "kernels" / f"cpu_attention-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as exc:
        log.warning("the C++ attention kernel is unavailable, the blend's CPU attention runs torch's SDPA: %s", exc)
        return None
    fn = lib.kvblend_selected_attention_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def supports(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors, and the kernel built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def selected_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """q [H, S, D] at plan.q_pos over k, v [KV, N, D] → [H, S, D]; `plan_attention` has checked the
    positions (strictly increasing, within its n_keys), so only the shapes are checked here."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the C++ attention kernel is unavailable (see the warning logged when it was built)")
    (heads, s, d), (kv_heads, n, _) = q.shape, k.shape
    if heads % kv_heads or k.shape != v.shape or k.shape[2] != d or plan.q_pos.shape != (s,) or plan.n_keys != n:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"{plan.q_pos.numel()} planned queries over {plan.n_keys} keys")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_pos = plan.q_pos.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    lib.kvblend_selected_attention_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), q_pos.data_ptr(),
                                       heads, kv_heads, s, n, d, scale, Q_TILE, K_TILE, torch.get_num_threads())
    return out
