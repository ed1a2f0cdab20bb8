"""RMSNorm and SiLU·up: the C++ kernels against their torch references and transformers' modules,
and the layer-wise model against the model's own forward with them in place."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tiny import ARCHS, make_tiny_model

from kvblend.kernels import cpu_library, rms_norm, silu_mul
from kvblend.kernels.norm_act import rms_norm_torch, silu_mul_torch
from kvblend.models.adapter import LayerwiseModel


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


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layerwise_model_equals_the_model_forward(tmp_path, arch):
    """Every layer run through the kernels and the addmm residuals gives the model's own logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, arch), dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (23,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
        m = LayerwiseModel(model)
        h = m.embed(ids)
        cos, sin = m.rope_tables(ids.numel())
        for i in range(m.num_layers):
            q, k, v = m.qkv(i, h)
            rot = lambda x: x * cos + torch.cat([-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]], -1) * sin
            group = m.num_heads // m.num_kv_heads
            attn = F.scaled_dot_product_attention(rot(q), rot(k).repeat_interleave(group, 0), v.repeat_interleave(group, 0),
                                                  is_causal=True, scale=m.scaling)
            h = m.mlp(i, m.attn_out(i, h, attn))
        torch.testing.assert_close(m.logits(h), expected, atol=1e-4, rtol=1e-4)
