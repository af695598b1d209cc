"""`XModalMLP` without autograd overwrites `fc1`'s output with an in-place activation kernel where one computes exactly
what `ACT2FN` computes: the result is bitwise the same as with autograd, training still backpropagates, and the
activations without such a kernel keep the out-of-place module."""

from __future__ import annotations

import pytest
import torch

from xmodal import XModalModel, XModalTextConfig
from xmodal.layers import _INPLACE_ACTIVATIONS, XModalMLP


def _mlp(hidden_act: str) -> XModalMLP:
    torch.manual_seed(0)
    return XModalMLP(
        XModalTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act=hidden_act)
    ).eval()


@pytest.mark.parametrize("hidden_act", sorted(_INPLACE_ACTIVATIONS))
def test_inplace_activation_matches_the_module_bitwise(hidden_act):
    mlp = _mlp(hidden_act)
    assert mlp.inplace_activation_fn is _INPLACE_ACTIVATIONS[hidden_act]
    inputs = torch.randn(2, 5, 32)
    expected = mlp.fc2(mlp.activation_fn(mlp.fc1(inputs)))
    with torch.inference_mode():
        inferred = mlp(inputs)
    with torch.no_grad():
        without_grad = mlp(inputs)
    assert torch.equal(inferred, expected) and torch.equal(without_grad, expected)


def test_inplace_activation_is_not_used_with_autograd():
    mlp = _mlp("gelu").train()
    inputs = torch.randn(2, 5, 32, requires_grad=True)
    mlp(inputs).square().sum().backward()  # an in-place activation would fail here (fc1's output is saved)
    assert inputs.grad is not None and all(p.grad is not None for p in mlp.parameters())


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu_new"])
def test_activations_without_an_exact_inplace_kernel_stay_out_of_place(hidden_act):
    mlp = _mlp(hidden_act)
    assert mlp.inplace_activation_fn is None
    inputs = torch.randn(2, 5, 32)
    with torch.inference_mode():
        assert torch.equal(mlp(inputs), mlp.fc2(mlp.activation_fn(mlp.fc1(inputs))))


def test_model_embeddings_are_the_same_with_and_without_autograd(tester):
    inputs = tester.get_inputs()
    model = XModalModel(tester.get_config()).eval()
    with torch.inference_mode():
        inferred = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    expected = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert torch.equal(inferred, expected)
