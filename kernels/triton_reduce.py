"""Row reductions for the kernels that work in Triton's interpreter whenever it is switched on.

Triton's own helpers (tl.sum, tl.max, tl.zeros) are @triton.jit functions made when triton is first
imported, which torch does at its own import, before a test or script can set TRITON_INTERPRET=1;
the interpreter cannot call such compiled-mode helpers. These are made when this module is first
imported, so they follow the mode in force then, like the kernels. They reduce with tl.sum's and
tl.max's own combine functions: compiled, they lower exactly as tl.sum / tl.max; interpreted, those
combiners take numpy's fast path (any other combiner runs element by element in Python).
"""
import triton
import triton.language as tl


@triton.jit
def row_sum(x):
    """Sum over the last axis of a 2-D tile."""
    return tl.reduce(x, 1, tl.standard._sum_combine)


@triton.jit
def row_max(x):
    """Max over the last axis of a 2-D tile."""
    return tl.reduce(x, 1, tl.standard._elementwise_max)
