"""The blend's four hot operations, each with a plain-torch reference and a Triton kernel, plus
the layer's element-wise steps (RMSNorm, SiLU·up).

Which implementation runs is chosen in one place, `dispatch.choose`: `backend="auto"` runs Triton
on CUDA tensors, the C++ kernels on CPU in fp32 (selected-query attention, RMSNorm, SiLU·up:
cpu_*.cpp, where they build) and torch elsewhere. The blend executor and the layer-wise model
call only the functions exported here.
"""
from kvblend.kernels.kv_deviation import kv_deviation
from kvblend.kernels.norm_act import rms_norm, silu_mul
from kvblend.kernels.rope_realign import rope_realign, rope_realign_span, rotate, rotate_into
from kvblend.kernels.scatter_rows import scatter_rows
from kvblend.kernels.selected_attention import AttentionPlan, plan_attention, selected_attention

__all__ = [
    "AttentionPlan", "kv_deviation", "plan_attention", "rms_norm", "rope_realign", "rope_realign_span", "rotate",
    "rotate_into", "scatter_rows", "selected_attention", "silu_mul",
]
