"""The lean gated MLP against the model's own MLP: same outputs and gradients, fewer saved activations."""

import copy

import pytest
import torch
from tiny import tiny_lm

from featalign.mlp import lean_mlp


def tiny(kind: str):
    return tiny_lm(kind, vocab=200, intermediate=96)  # Gemma-2's MLP gates with gelu (tanh) instead of SiLU


def saved_bytes(model, ids):
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = model(input_ids=ids, labels=ids).loss
    return loss, total[0]


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_lean_mlp_gives_the_same_loss_and_gradients_and_saves_less(kind):
    plain = tiny(kind)
    lean = copy.deepcopy(plain)
    assert lean_mlp(lean) == 2
    ids = torch.randint(0, 200, (3, 17), generator=torch.Generator().manual_seed(1))
    l_plain, b_plain = saved_bytes(plain, ids)
    l_lean, b_lean = saved_bytes(lean, ids)
    l_plain.backward(), l_lean.backward()
    assert abs(l_plain.item() - l_lean.item()) < 1e-6
    g_plain = dict(plain.named_parameters())
    for name, p in lean.named_parameters():
        assert torch.allclose(p.grad, g_plain[name].grad, atol=1e-7, rtol=1e-5), name
    # two [tokens x intermediate] float32 tensors fewer per layer (the activation and the product)
    assert b_plain - b_lean >= 2 * 2 * ids.numel() * 96 * 4


def test_an_mlp_of_another_shape_is_left_alone():
    model = tiny("llama")
    mlp = model.model.layers[0].mlp
    orig = type(mlp).forward
    type(mlp).forward = lambda self, x: 2 * orig(self, x)  # not down(act(gate) * up)
    try:
        assert lean_mlp(model) == 0
    finally:
        type(mlp).forward = orig


def test_under_peft_the_wrapped_down_projection_takes_the_plain_path():
    pytest.importorskip("peft", reason="peft (test extra) is not installed")
    from peft import LoraConfig, get_peft_model

    base = tiny("llama")
    want = copy.deepcopy(base)
    assert lean_mlp(base) == 2
    model = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear"))
    ref = get_peft_model(want, LoraConfig(r=2, target_modules="all-linear"))
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)
