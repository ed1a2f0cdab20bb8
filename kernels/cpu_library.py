"""kvblend's C++ CPU kernels (cpu_*.cpp): built on first use with the machine's C++ compiler into
one library, cached under `$KVBLEND_HOME/kernels`, loaded with ctypes.

Where the library cannot be built (no compiler, a torch without MKL's sgemm), `library()` is None
and every caller runs its torch path, after one warning.
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

import torch

from kvblend.config import kvblend_home

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCES = [HERE / "cpu_attention.cpp", HERE / "cpu_norm_act.cpp"]
HEADERS = [HERE / "cpu_math.h"]
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")  # gcc keeps AVX-512 machines on 256-bit vectors otherwise
TORCH_LIB = Path(torch.__file__).parent / "lib"  # libtorch_cpu exports MKL's sgemm_; the libgomp there is torch's
_P, _I, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {  # name: argument types (all return void)
    "kvblend_selected_attention_f32": [_P] * 5 + [_I] * 5 + [_F, _I, _I, _T],
    "kvblend_rms_norm_f32": [_P] * 3 + [_I] * 2 + [_F, _T],
    "kvblend_silu_mul_f32": [_P] * 2 + [_I] * 2 + [_T],
}


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), f"-L{TORCH_LIB}", "-ltorch_cpu",
               f"-Wl,-rpath,{TORCH_LIB}"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: processes building at once each publish a whole file


@functools.cache
def library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("no C++ compiler found: kvblend's CPU kernels run on torch (the blend is slower); install g++")
        return None
    texts = [p.read_text() for p in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, compiler, *FLAGS, str(TORCH_LIB), torch.__version__, _cpu_flags()]).encode())
    target = kvblend_home() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
        for name, argtypes in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = None, argtypes
    except (OSError, RuntimeError, AttributeError) as exc:
        log.warning("kvblend's C++ CPU kernels are unavailable, the blend runs torch's ops (slower): %s", exc)
        return None
    return lib


def available() -> bool:
    return library() is not None


def supports(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors, and the library built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def require() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("kvblend's C++ CPU kernels are unavailable (see the warning logged when they were built)")
    return lib
