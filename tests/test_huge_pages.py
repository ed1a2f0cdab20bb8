"""Model weights in a huge-page arena: same numbers, tied weights stay tied, the arena is really on 2 MB pages."""
import pytest
import torch
from huge import huge_bytes_at, huge_pages_allowed
from torch import nn

from kvblend.models import LayerwiseModel
from kvblend.models.huge_pages import HUGE_PAGE, HugePageArena


def test_arena_hands_out_aligned_tensors_until_full():
    arena = HugePageArena(4 << 20)
    a = arena.empty((3, 5), torch.float32)
    b = arena.empty((1000,), torch.bfloat16)
    assert a.data_ptr() % HUGE_PAGE == 0 and b.data_ptr() % 64 == 0 and b.data_ptr() >= a.data_ptr() + a.nbytes
    a.fill_(1.5)
    b.fill_(2.0)
    assert a.sum().item() == 22.5 and arena.holds(b) and not arena.holds(torch.zeros(3))
    with pytest.raises(MemoryError, match="arena of 4194304 bytes is full"):
        arena.empty((1 << 20,), torch.float32)


def test_weights_move_into_the_arena_without_changing_the_model(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.arange(4, 40)[None]
    with torch.no_grad():
        before = model(ids).logits
    LayerwiseModel(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    base = min(p.data_ptr() for p in params.values())
    assert all(0 <= p.data_ptr() - base < HugePageArena.size_for(model) for p in params.values())  # one block
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert not any(p.requires_grad for p in params.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.skipif(not huge_pages_allowed(), reason="this kernel's transparent_hugepage mode is 'never'")
def test_the_arena_is_backed_by_huge_pages():
    arena = HugePageArena(8 << 20)
    t = arena.empty((2 << 20,), torch.float32)
    t.fill_(1.0)  # pages are allocated at first touch
    assert huge_bytes_at(t.data_ptr()) >= 6 << 20  # 4 whole 2 MB pages, give or take khugepaged's timing


def test_a_module_with_shared_parameters_keeps_them_shared():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 2))
    x = torch.randn(3, 8)
    before = model(x)
    arena = HugePageArena(HugePageArena.size_for(model))
    arena.adopt(model)
    assert model[0] is model[2] and all(arena.holds(p) for p in model.parameters())
    assert torch.equal(model(x), before)
