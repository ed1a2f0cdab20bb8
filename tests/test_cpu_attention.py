"""The C++ CPU attention kernel against the torch reference and a textbook dense attention."""
import logging

import pytest
import torch

from tiny import dense_attention

from kvblend.kernels import cpu_attention, cpu_library, plan_attention, selected_attention


def test_the_kernel_builds_here():
    """CI has a compiler: the fast path must really run there, not fall back silently."""
    assert cpu_library.available()


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 16), (8, 1, 128)])
@pytest.mark.parametrize("n_keys,selection", [(700, "scattered"), (700, "all"), (300, "last"), (1, "all"), (513, "first")])
def test_kernel_matches_reference(heads, kv_heads, dim, n_keys, selection):
    g = torch.Generator().manual_seed(n_keys + heads)
    q_pos = {
        "scattered": torch.randperm(n_keys, generator=g)[: n_keys // 6].sort().values,  # crosses query and key tiles
        "all": torch.arange(n_keys),  # a full causal prefill
        "last": torch.tensor([n_keys - 1]),  # the last prompt token
        "first": torch.tensor([0, 1, 255, 256, 257]),  # tile edges
    }[selection]
    q = torch.randn(heads, q_pos.numel(), dim, generator=g) * 3  # sharp softmaxes too
    k, v = torch.randn(kv_heads, n_keys, dim, generator=g), torch.randn(kv_heads, n_keys, dim, generator=g)
    plan = plan_attention(q_pos, n_keys, heads // kv_heads, block=128)
    got = cpu_attention.selected_attention_cpu(q, k, v, plan, dim**-0.5)
    torch.testing.assert_close(got, dense_attention(q, k, v, q_pos, dim**-0.5), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, selected_attention(q, k, v, plan, dim**-0.5, backend="torch"), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(selected_attention(q, k, v, plan, dim**-0.5), got, atol=0, rtol=0)  # auto runs it


def test_non_contiguous_inputs_and_other_dtypes():
    g = torch.Generator().manual_seed(1)
    q_pos = torch.tensor([3, 40, 41, 99])
    q = torch.randn(4, 32, 2, 6, generator=g)[:, :, 0].permute(2, 0, 1)  # [6 heads, 4 queries, 32], not contiguous
    k = torch.randn(100, 2, 32, generator=g).transpose(0, 1)  # [2, 100, 32], not contiguous
    v = torch.randn(2, 100, 32, generator=g)
    expected = dense_attention(q, k, v, q_pos, 0.2)
    plan = plan_attention(q_pos, 100, 3)
    torch.testing.assert_close(cpu_attention.selected_attention_cpu(q, k, v, plan, 0.2), expected, atol=2e-5, rtol=2e-5)
    assert not cpu_library.supports(q.bfloat16(), k.bfloat16(), v.bfloat16())  # bf16 stays on the torch path
    out = selected_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, 0.2)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_bad_shapes_are_refused_before_the_kernel_runs():
    q, k, v = torch.randn(4, 3, 8), torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="3 planned queries over 20 keys"):  # a plan for more keys than given
        cpu_attention.selected_attention_cpu(q, k, v, plan_attention(torch.tensor([1, 2, 15]), 20, 2), 0.3)
    with pytest.raises(ValueError, match="shapes do not fit"):
        cpu_attention.selected_attention_cpu(torch.randn(3, 3, 8), k, v, plan_attention(torch.tensor([1, 2, 3]), 10, 1), 0.3)


def test_no_compiler_falls_back_to_torch_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("KVBLEND_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_library.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kvblend.kernels.cpu_library"):
            assert not cpu_library.available()
        assert "runs torch's ops" in caplog.text and "no-such-compiler" in caplog.text
        q_pos = torch.tensor([2, 5])
        q, k, v = torch.randn(2, 2, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 8)
        out = selected_attention(q, k, v, plan_attention(q_pos, 6, 2), 0.5)  # the torch path answers
        torch.testing.assert_close(out, dense_attention(q, k, v, q_pos, 0.5), atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_attention.selected_attention_cpu(q, k, v, plan_attention(q_pos, 6, 2), 0.5)
    finally:
        monkeypatch.undo()
        cpu_library.library.cache_clear()
