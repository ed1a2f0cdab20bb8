"""The C++ selected-query attention kernel for CPU fp32 (cpu_attention.cpp, built by cpu_library).

Faster than torch's SDPA over the masked blocks (docs/benchmarks.md): no mask tensor is read and
no key past a query's position is multiplied. Where the library cannot be built, the torch path runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvblend.kernels import cpu_library

if TYPE_CHECKING:
    from kvblend.kernels.selected_attention import AttentionPlan

Q_TILE, K_TILE = 64, 256  # queries (times the GQA group) and keys per tile; tuned on SmolLM2-135M shapes


def selected_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """q [H, S, D] at plan.q_pos over k, v [KV, N, D] → [H, S, D]; `plan_attention` has checked the
    positions (strictly increasing, within its n_keys), so only the shapes are checked here."""
    lib = cpu_library.require()
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
