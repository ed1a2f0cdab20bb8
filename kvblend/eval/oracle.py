"""Oracle selections: the ceiling of choosing which cached tokens a blend recomputes (research only).

Both rank a prompt's cached tokens with what no request has, full prefill's KV:

- `kv`: how far each token's reused KV is from full prefill's, over every layer (keys and values,
  relative to the layer's typical norm, so every layer counts alike);
- `out`: the token's effect on the output, to first order: the gradient of the teacher-forced KL
  (full prefill vs reuse) with respect to the token's reused KV, dotted with the change full
  prefill would make to that KV, summed over layers.

The blend then recomputes the top r of that ranking (`BlendExecutor.run(ranking=...)`). If the
oracle at a ratio is not far below reuse, selection is not what limits quality at that ratio.
"""
from __future__ import annotations

from typing import Literal

import torch

from kvblend.engines.hf import to_dynamic_cache
from kvblend.eval.metrics import kl_divergence

OracleKind = Literal["kv", "out"]
ORACLES: tuple[str, ...] = ("kv", "out")


def _layers(cache, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [KV, n, D] of a DynamicCache's first n positions."""
    return [(layer.keys[0, :, :n], layer.values[0, :, :n]) for layer in cache.layers]


def kv_distance(full_cache, reuse_cache, n: int) -> torch.Tensor:
    """[n] summed over layers: squared distance of reuse's K and V to full prefill's, relative to the
    layer's mean squared K (or V) norm, so every layer counts alike."""
    score = torch.zeros(n, dtype=torch.float64)
    for (fk, fv), (rk, rv) in zip(_layers(full_cache, n), _layers(reuse_cache, n)):
        for a, b in ((fk, rk), (fv, rv)):
            d = (a.float() - b.float()).pow(2).sum(dim=(0, 2)).double().cpu()
            score += d / a.float().pow(2).sum(dim=(0, 2)).double().mean().clamp_min(1e-30).cpu()
    return score


def output_effect(model, ids: torch.Tensor, full_cache, reuse_cache, reference_logits: torch.Tensor,
                  forced: list[int]) -> torch.Tensor:
    """[n]: |∇KL · (full KV − reused KV)| per position, summed over layers (0 for the last prompt token).

    The KL is over the teacher-forced positions (`reference_logits` [T, vocab] from full prefill,
    `forced` the T − 1 tokens fed after the prompt), computed from the reused KV of positions
    0..n−2 with the last prompt token run fresh, as every method runs it."""
    n = ids.numel()
    leaves = [(k.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True))
              for k, v in _layers(reuse_cache, n - 1)]
    cache = to_dynamic_cache(model.config, [k for k, _ in leaves], [v for _, v in leaves])
    inputs = torch.tensor([[int(ids[-1])] + list(forced)], device=ids.device)
    positions = torch.arange(n - 1, n - 1 + inputs.shape[1], device=ids.device)[None]
    with torch.enable_grad():
        logits = model(input_ids=inputs, past_key_values=cache, position_ids=positions, use_cache=True).logits[0].float()
        loss = kl_divergence(reference_logits[: logits.shape[0]], logits).sum()
        grads = torch.autograd.grad(loss, [t for pair in leaves for t in pair])
    score = torch.zeros(n, dtype=torch.float64)
    full = _layers(full_cache, n - 1)
    for layer, (fk, fv) in enumerate(full):
        (rk, rv), gk, gv = leaves[layer], grads[2 * layer], grads[2 * layer + 1]
        change = (gk * (fk.float() - rk.detach())).sum(dim=(0, 2)) + (gv * (fv.float() - rv.detach())).sum(dim=(0, 2))
        score[: n - 1] += change.double().cpu()
    return score.abs()


def oracle_ranking(kind: OracleKind, model, ids: torch.Tensor, full_cache, reuse_cache,
                   reference_logits: torch.Tensor, forced: list[int]) -> torch.Tensor:
    """The oracle's [n] scores (higher: recompute first) for one prompt."""
    if kind == "kv":
        return kv_distance(full_cache, reuse_cache, ids.numel())
    if kind == "out":
        return output_effect(model, ids, full_cache, reuse_cache, reference_logits, forced)
    raise ValueError(f"unknown oracle {kind!r}; choose one of {ORACLES}")
