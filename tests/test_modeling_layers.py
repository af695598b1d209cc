"""Stochastic depth (`drop_path_rate` of the vision, text and fusion configs; `XModalDropPath`): linear per-layer
rates, the identity at rate 0 and in eval mode (no random numbers drawn), unbiased per-sample drops of whole
branches, the same draws with and without padding skipped, gradients, checkpointing, save/load and validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from xmodal import (
    XModalConfig,
    XModalCrossConfig,
    XModalForPreTraining,
    XModalModel,
    XModalTextConfig,
    XModalVisionConfig,
)
from xmodal.layers import XModalDropPath, XModalEncoderLayer, _TokenPacking

TOWERS = ("vision_config", "text_config", "cross_config")


def _config(tester, rate: float | None, **overrides: object) -> XModalConfig:
    """The tester's tiny config with `drop_path_rate=rate` in the three towers; None leaves the field out of the
    config dict altogether (a config.json written before the field existed)."""
    values = tester.get_config(**overrides).to_dict()
    for name in TOWERS:
        values[name] = {key: value for key, value in values[name].items() if key != "drop_path_rate"}
        if rate is not None:
            values[name]["drop_path_rate"] = rate
    return XModalConfig.from_dict(values)


def _model(tester, rate: float | None, seed: int = 0, **overrides: object) -> XModalModel:
    torch.manual_seed(seed)
    return XModalModel(_config(tester, rate, **overrides))


def _outputs(model: XModalModel, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every tower's and the fusion module's outputs."""
    out = model(**inputs, return_loss=True)
    fused = model.get_multimodal_features(**inputs)
    return [
        out.loss,
        out.logits_per_text,
        out.vision_model_output.last_hidden_state,
        out.text_model_output.last_hidden_state,
        fused.pooler_output,
        fused.text_last_hidden_state,
    ]


def _layer_rates(layers: torch.nn.ModuleList) -> list[float]:
    return [0.0 if layer.drop_path is None else layer.drop_path.drop_prob for layer in layers]


def _packing(lengths: list[int], length: int) -> _TokenPacking:
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
    return _TokenPacking.from_mask(mask)


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["text_to_image", "both"])
def test_rates_rise_linearly_with_depth(tester, direction: str) -> None:
    tester.num_layers, tester.direction = 4, direction
    model = _model(tester, 0.3)
    expected = [0.0, 0.1, 0.2, 0.3]
    timm = [x.item() for x in torch.linspace(0, 0.3, 4)]  # timm's schedule (float32)
    stacks = [model.vision_model.encoder.layers, model.text_model.encoder.layers, model.cross_model.text_layers]
    if direction == "both":
        stacks.append(model.cross_model.image_layers)
    for layers in stacks:
        rates = _layer_rates(layers)
        assert rates == pytest.approx(expected, abs=1e-12)
        assert rates == pytest.approx(timm, abs=1e-7)
        assert layers[0].drop_path is None  # rate 0 at the first layer: no module at all
        assert rates[-1] == 0.3  # exactly the configured maximum at the last


def test_decoders_have_no_drop_path(tester) -> None:
    # the MIM decoder (MAE's has none) and the captioning decoder stay without drop path
    torch.manual_seed(0)
    model = XModalForPreTraining(_config(tester, 0.3))
    decoders = [module for name, module in model.named_modules() if "decoder" in name]
    assert decoders
    layers = [module for module in decoders if isinstance(module, XModalEncoderLayer)]
    assert layers and all(layer.drop_path is None for layer in layers)


def test_single_layer_gets_rate_zero(tester) -> None:
    # timm's linspace(0, rate, 1) is [0.]: one block is never dropped
    tester.num_layers = 1
    model = _model(tester, 0.5)
    assert model.vision_model.encoder.layers[0].drop_path is None


def test_round_trip_keeps_the_field(tester, tmp_path) -> None:
    model = _model(tester, 0.1)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert all(saved[name]["drop_path_rate"] == 0.1 for name in TOWERS)
    loaded = XModalModel.from_pretrained(tmp_path)
    for name in TOWERS:
        assert getattr(loaded.config, name).drop_path_rate == 0.1
    assert _layer_rates(loaded.vision_model.encoder.layers) == _layer_rates(model.vision_model.encoder.layers)
    assert _layer_rates(loaded.cross_model.text_layers)[-1] == pytest.approx(0.1)
    # a config.json without the field (written before it existed) loads with 0
    for name in TOWERS:
        del saved[name]["drop_path_rate"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = XModalConfig.from_pretrained(tmp_path)
    assert all(getattr(old, name).drop_path_rate == 0.0 for name in TOWERS)


@pytest.mark.parametrize("config_class", [XModalVisionConfig, XModalTextConfig, XModalCrossConfig])
@pytest.mark.parametrize("value", [1.5, 1.0, -0.1, float("nan"), "0.1", True, None])
def test_invalid_values_raise(config_class: type, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.drop_path_rate must be a float in \[0, 1\)"):
        config_class(drop_path_rate=value)


def test_invalid_value_in_the_composite_config_names_the_field(tester) -> None:
    with pytest.raises(ValueError, match=r"vision_config: XModalVisionConfig\.drop_path_rate .* got 1\.5"):
        tester.get_config(vision_config={"drop_path_rate": 1.5})
    with pytest.raises(ValueError, match="XModalDropPath.drop_prob must be in"):
        XModalDropPath(1.0)


# ----------------------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------------------


def test_drops_whole_samples_and_scales_the_kept_ones() -> None:
    torch.manual_seed(0)
    drop_path = XModalDropPath(0.5).train()
    inputs = torch.randn(64, 5, 8)
    torch.manual_seed(1)
    outputs = drop_path(inputs)
    dropped = outputs.flatten(1).eq(0).all(dim=1)
    # a sample is dropped at every position, or kept everywhere and scaled by 1 / keep_prob
    torch.testing.assert_close(outputs[~dropped], inputs[~dropped] / 0.5)
    assert 0 < int(dropped.sum()) < 64
    # the same draws on the (N, C) real tokens of a padded batch: a sequence's tokens share its draw
    lengths = [5 - row % 5 for row in range(64)]
    packing = _packing(lengths, 5)
    torch.manual_seed(1)
    packed = drop_path(packing.unpad(inputs), packing)
    torch.testing.assert_close(packed, packing.unpad(outputs), rtol=0, atol=0)


def test_expected_value_is_preserved() -> None:
    # each sample's output on a constant tensor is 0 or 1 / keep: mean 1, variance (1 - keep) / keep = 3/7 for
    # drop 0.3. The mean of 200 x 100 = 20,000 independent draws has a standard error of sqrt(3/7 / 20000) =
    # 0.0046, so 0.025 is more than 5 standard errors (a seeded run, so the check is also deterministic).
    torch.manual_seed(0)
    drop_path = XModalDropPath(0.3).train()
    inputs = torch.full((100, 3, 4), 2.0)
    draws = torch.stack([drop_path(inputs) for _ in range(200)])  # (200, 100, 3, 4)
    values = draws.unique()
    torch.testing.assert_close(values, torch.tensor([0.0, 2.0 / 0.7]))
    assert abs(draws.mean().item() / 2.0 - 1.0) < 0.025


def test_identity_in_eval_and_at_rate_zero_without_random_draws() -> None:
    inputs = torch.randn(4, 3, 8)
    for drop_path in (XModalDropPath(0.5).eval(), XModalDropPath(0.0).train()):
        state = torch.get_rng_state()
        assert drop_path(inputs) is inputs
        assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------------------------------------------
# in the model
# ----------------------------------------------------------------------------------------------------------------


def test_rate_zero_is_bit_identical_and_draws_nothing(tester) -> None:
    inputs = tester.get_inputs()
    without, zero = _model(tester, None).train(), _model(tester, 0.0).train()
    assert not any(isinstance(module, XModalDropPath) for module in zero.modules())
    assert str(zero) == str(without)  # the same modules as before the field existed
    state = torch.get_rng_state()
    reference = _outputs(without, inputs)
    assert torch.equal(torch.get_rng_state(), state)  # no dropout either in the tiny config: nothing drawn
    outputs = _outputs(zero, inputs)
    assert torch.equal(torch.get_rng_state(), state)
    for ours, theirs in zip(outputs, reference):
        assert torch.equal(ours, theirs)


def test_eval_is_deterministic_and_equals_rate_zero(tester) -> None:
    inputs = tester.get_inputs()
    dropping, plain = _model(tester, 0.5).eval(), _model(tester, 0.0).eval()
    plain.load_state_dict(dropping.state_dict())
    state = torch.get_rng_state()
    with torch.no_grad():
        first, second, reference = _outputs(dropping, inputs), _outputs(dropping, inputs), _outputs(plain, inputs)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b, c in zip(first, second, reference):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_training_outputs_change_between_calls(tester) -> None:
    inputs = tester.get_inputs()
    model = _model(tester, 0.5).train()
    with torch.no_grad():
        torch.manual_seed(1)
        first = _outputs(model, inputs)
        second = _outputs(model, inputs)
        torch.manual_seed(1)
        repeated = _outputs(model, inputs)
        evaluated = _outputs(model.eval(), inputs)
    # every tower and the fusion module draw: each output moves between calls, and comes back with the seed
    for index, (a, b, c, d) in enumerate(zip(first, second, repeated, evaluated)):
        assert not torch.equal(a, b), index
        assert not torch.equal(a, d), index
        assert torch.equal(a, c), index


@pytest.mark.parametrize("rate", [0.5, 0.0])
def test_packed_text_matches_padded_in_training(tester, rate: float) -> None:
    model = _model(tester, rate).train()
    inputs = tester.get_inputs()
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    real = inputs["attention_mask"].bool()
    results = {}
    with torch.no_grad():
        for skip in (True, False):
            model.text_model.skip_padding = skip
            torch.manual_seed(3)
            results[skip] = model.get_text_features(**text, output_hidden_states=True)
    packed, padded = results[True], results[False]
    torch.testing.assert_close(packed.pooler_output, padded.pooler_output, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(packed.hidden_states, padded.hidden_states):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    if rate:  # the same seed in eval mode differs: drop path did drop something
        with torch.no_grad():
            evaluated = model.eval().get_text_features(**text)
        assert not torch.allclose(evaluated.pooler_output, padded.pooler_output, atol=1e-4)


def test_every_parameter_gets_a_gradient(tester) -> None:
    tester.direction = "both"
    model = _model(tester, 0.1).train()
    inputs = tester.get_inputs()
    torch.manual_seed(0)
    for _ in range(3):  # summed over steps: a branch dropped for every sample of one step still learns in another
        outputs = _outputs(model, inputs)
        loss = outputs[0] + outputs[4].pow(2).mean()  # the contrastive loss and the fused representation
        assert torch.isfinite(loss)
        loss.backward()
    missing = [name for name, param in model.named_parameters() if param.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    zero = [name for name, param in model.named_parameters() if not param.grad.any() and "bias" not in name]
    assert not zero, f"parameters with only zero gradients: {zero}"


def test_gradient_checkpointing_redraws_the_same_masks(tester) -> None:
    model = _model(tester, 0.5).train()
    inputs = tester.get_inputs()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        torch.manual_seed(5)
        outputs = _outputs(model, inputs)
        loss = outputs[0] + outputs[4].pow(2).mean()  # every tower and the fusion module
        loss.backward()
        grads.append((loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}))
    (loss, reference), (checkpointed, ours) = grads
    torch.testing.assert_close(checkpointed, loss)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rates_are_finite_below_one() -> None:
    # a rate just below 1 must not round to 1 in the schedule (keep_prob 0 would divide by zero)
    from xmodal.layers import _drop_path_rates

    rates = _drop_path_rates(1 - 1e-9, 3)
    assert rates[-1] < 1.0 and all(math.isfinite(1 / (1 - rate)) for rate in rates)
