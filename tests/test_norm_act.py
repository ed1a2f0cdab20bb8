"""RMSNorm and SiLU·up: the C++ kernels against their torch references and transformers' modules.
(The layer-wise model with them in place is held to the model's own forward by
test_blend_invariants.test_full_recompute_reproduces_full_prefill, on every architecture.)"""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kvblend.kernels import cpu_library, rms_norm, silu_mul
from kvblend.kernels.norm_act import rms_norm_torch, silu_mul_torch


@pytest.mark.parametrize("rows,dim", [(1, 576), (37, 64), (1030, 100), (0, 8), (5, 1)])
def test_rms_norm_matches_the_reference_and_the_llama_module(rows, dim):
    assert cpu_library.available()
    g = torch.Generator().manual_seed(rows + dim)
    x = torch.randn(rows, dim, generator=g) * 30  # large activations, as residual streams have
    norm = LlamaRMSNorm(dim, eps=1e-5)
    norm.weight.data = torch.randn(dim, generator=g)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(got, rms_norm_torch(x, norm.weight, 1e-5), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(got, norm(x), atol=1e-5, rtol=1e-5)


def test_rms_norm_takes_views_and_other_dtypes():
    x = torch.randn(4, 6, 32)[:, 1:5]  # not contiguous
    w = torch.rand(32)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_torch(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    xb = x.bfloat16()
    assert torch.equal(rms_norm(xb, w.bfloat16(), 1e-6), rms_norm_torch(xb, w.bfloat16(), 1e-6))  # the torch path
    with pytest.raises(ValueError, match="RMSNorm weight"):
        rms_norm(x, torch.ones(31), 1e-6)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (33, 17), (700, 256), (0, 4)])
def test_silu_mul_matches_the_reference(rows, inter):
    g = torch.Generator().manual_seed(rows * 7 + inter)
    gate_up = torch.randn(rows, 2 * inter, generator=g) * 8
    if rows and inter >= 4:
        gate_up[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])  # saturated and zero gates
    got = silu_mul(gate_up)
    assert got.shape == (rows, inter)
    torch.testing.assert_close(got, silu_mul_torch(gate_up), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="odd width"):
        silu_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="backend 'triton'"):
        silu_mul(torch.randn(2, 8), backend="triton")
    x = torch.randn(3, 8)
    assert torch.equal(rms_norm(x, torch.ones(8), 1e-6, backend="torch"), rms_norm_torch(x, torch.ones(8), 1e-6))
