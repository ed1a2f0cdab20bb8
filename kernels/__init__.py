"""The blend's four hot operations, each with a plain-torch reference and a Triton kernel.

`backend="auto"` runs Triton on CUDA tensors, the C++ kernel for selected-query attention on CPU
in fp32 (cpu_attention.cpp, where it builds) and torch elsewhere; the blend executor calls only
the functions exported here.
"""
from kvblend.kernels.kv_deviation import kv_deviation
from kvblend.kernels.rope_realign import rope_realign, rope_realign_span, rotate, rotate_into
from kvblend.kernels.scatter_rows import scatter_rows, scatter_rows_paged
from kvblend.kernels.selected_attention import AttentionPlan, plan_attention, selected_attention

__all__ = [
    "AttentionPlan", "kv_deviation", "plan_attention", "rope_realign", "rope_realign_span", "rotate",
    "rotate_into", "scatter_rows", "scatter_rows_paged", "selected_attention",
]
