"""The conventions every transformers model honours (issue 20), checked on every public xmodal model class as
transformers' CLIP, BLIP and FLAVA tests check them: output_attentions / output_hidden_states (shapes, retain_grad),
eager vs sdpa, composite attention dispatch, gradients with and without gradient checkpointing,
resize_token_embeddings, partial saves, main_input_name / base_model_prefix, the generation head's outputs and
cache argument, and config round trips."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from test_modeling_heads import HEADS, build_head, head_inputs
from transformers import DynamicCache, PreTrainedModel

from xmodal import (
    XModalConfig,
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForImageTextRetrieval,
    XModalForPreTraining,
    XModalModel,
)
from xmodal.outputs import XModalForConditionalGenerationOutput

SUB_CONFIGS = ("vision_config", "text_config", "cross_config", "decoder_config", "mim_decoder_config")
VOCABULARY_HEADS = [h for h in HEADS if h is not XModalForImageClassification]


pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(head_class: type, tester, with_labels: bool = False, padding: str = "right") -> dict:
    inputs = head_inputs(head_class, tester, with_labels)
    if padding == "left" and "attention_mask" in inputs:
        mask, ids = inputs["attention_mask"], inputs["input_ids"]
        left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
        for row, length in enumerate(mask.sum(dim=1).tolist()):
            left_ids[row, -length:], left_mask[row, -length:] = ids[row, :length], 1
        inputs.update(input_ids=left_ids, attention_mask=left_mask)
    return inputs


def _tensors(output) -> dict[str, torch.Tensor]:
    return {name: value for name, value in output.items() if isinstance(value, torch.Tensor)}


def _inspect(head_class: type, model: torch.nn.Module, inputs: dict):
    """The forward with hidden states and attentions asked for (XModalModel: with its fusion output too)."""
    extra = {"return_multimodal_output": True} if head_class is XModalModel else {}
    torch.manual_seed(0)
    return model(**inputs, output_attentions=True, output_hidden_states=True, **extra)


# ------------------------------------------------------------------------------------------- attention dispatch


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_eager_and_sdpa_agree(tester, head_class, dtype, padding):
    model = build_head(tester, head_class).eval().to(dtype)
    inputs = _inputs(head_class, tester, padding=padding)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    results = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        torch.manual_seed(0)
        with torch.no_grad():
            results[implementation] = _tensors(model(**inputs))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert results["eager"].keys() == results["sdpa"].keys()
    for name, value in results["eager"].items():
        torch.testing.assert_close(value.float(), results["sdpa"][name].float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.__name__)
def test_attention_implementation_is_dispatched_per_sub_model(tester, tmp_path, head_class):
    build_head(tester, head_class).save_pretrained(tmp_path)
    requested = {"vision_config": "eager", "text_config": "sdpa", "cross_config": "eager", "decoder_config": "eager"}
    model = head_class.from_pretrained(tmp_path, attn_implementation=requested)
    sub_models = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m is not model]
    assert sub_models and all(m._supports_sdpa for m in sub_models)
    for module in sub_models:
        key = next(key for key in SUB_CONFIGS if getattr(model.config, key) is module.config)
        expected = requested.get(key, "sdpa")
        assert module.config._attn_implementation == expected, (type(module).__name__, key)
    model.set_attn_implementation({"vision_config": "sdpa", "text_config": "eager"})
    for module in sub_models:
        if module.config is model.config.vision_config:
            assert module.config._attn_implementation == "sdpa"
        if module.config is model.config.text_config:
            assert module.config._attn_implementation == "eager"
    model.set_attn_implementation("eager")
    assert all(m.config._attn_implementation == "eager" for m in sub_models)


# ------------------------------------------------------------------------------- hidden states and attentions


def _tower_shapes(tester) -> dict[str, tuple[int, ...]]:
    b, heads, d = tester.batch_size, tester.num_heads, tester.hidden_size
    tokens, length = 1 + (tester.image_size // tester.patch_size) ** 2, tester.seq_length
    return {
        "vision_hidden": (b, tokens, d),
        "vision_attention": (b, heads, tokens, tokens),
        "text_hidden": (b, length, d),
        "text_attention": (b, heads, length, length),
        "cross_attention": (b, heads, length, tokens),
    }


def _assert_tower(output, hidden: tuple, attention: tuple, num_layers: int) -> None:
    assert len(output.hidden_states) == num_layers + 1 and len(output.attentions) == num_layers
    assert all(tuple(h.shape) == hidden for h in output.hidden_states)
    assert all(tuple(a.shape) == attention for a in output.attentions)


def _assert_fusion(fused, shapes: dict, num_layers: int, rows: int | None = None) -> None:
    """The text stream's hidden states and attentions (direction text_to_image) of `rows` pairs."""
    shape = lambda key: (rows or shapes[key][0], *shapes[key][1:])  # noqa: E731
    assert len(fused.text_hidden_states) == num_layers + 1
    assert all(tuple(h.shape) == shape("text_hidden") for h in fused.text_hidden_states)
    assert [tuple(a.shape) for a in fused.text_attentions] == [shape("text_attention")] * num_layers
    assert [tuple(a.shape) for a in fused.text_cross_attentions] == [shape("cross_attention")] * num_layers
    assert fused.image_hidden_states is None and fused.image_attentions is None


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.__name__)
def test_hidden_states_and_attentions_have_the_documented_shapes(tester, head_class):
    model = build_head(tester, head_class).eval()
    model.set_attn_implementation("eager")
    out = _inspect(head_class, model, _inputs(head_class, tester, with_labels=True))
    shapes, layers = _tower_shapes(tester), tester.num_layers
    if head_class is XModalForImageClassification:
        _assert_tower(out, shapes["vision_hidden"], shapes["vision_attention"], layers)
        return
    _assert_tower(out.vision_model_output, shapes["vision_hidden"], shapes["vision_attention"], layers)
    if head_class is XModalForConditionalGeneration:
        b, length = tester.batch_size, tester.seq_length
        assert len(out.hidden_states) == layers + 1 and out.hidden_states[0].shape == (b, length, tester.hidden_size)
        assert [tuple(a.shape) for a in out.attentions] == [shapes["text_attention"]] * layers
        assert [tuple(a.shape) for a in out.cross_attentions] == [shapes["cross_attention"]] * layers
        return
    _assert_tower(out.text_model_output, shapes["text_hidden"], shapes["text_attention"], layers)
    _assert_fusion(
        out.multimodal_output,
        shapes,
        layers,
        rows=out.get("itm_logits", out.logits_per_text).shape[0]
        if head_class in (XModalForPreTraining, XModalForImageTextRetrieval)
        else None,
    )
    if head_class is XModalForPreTraining:
        _assert_fusion(out.multimodal_masked_output, shapes, layers)


@pytest.mark.parametrize("direction", ["image_to_text", "both"])
def test_fusion_streams_report_their_hidden_states_and_attentions(tester, direction):
    tester.direction = direction
    model = build_head(tester, XModalModel).eval()
    model.set_attn_implementation("eager")
    fused = model.get_multimodal_features(**tester.get_inputs(), output_hidden_states=True, output_attentions=True)
    shapes, layers = _tower_shapes(tester), tester.num_layers
    b, heads, tokens, length = tester.batch_size, tester.num_heads, shapes["vision_hidden"][1], tester.seq_length
    assert len(fused.image_hidden_states) == layers + 1
    assert [tuple(a.shape) for a in fused.image_attentions] == [(b, heads, tokens, tokens)] * layers
    assert [tuple(a.shape) for a in fused.image_cross_attentions] == [(b, heads, tokens, length)] * layers
    assert (fused.text_hidden_states is not None) == (direction == "both")


def test_output_flags_default_to_the_config_and_sdpa_returns_no_weights(tester):
    model = XModalModel(tester.get_config(output_hidden_states=True)).eval()
    out = model(**tester.get_inputs())
    assert len(out.vision_model_output.hidden_states) == len(out.text_model_output.hidden_states) == 3
    assert model(**tester.get_inputs(), output_hidden_states=False).vision_model_output.hidden_states is None
    # as in transformers: sdpa computes no attention weights (and warns when asked)
    assert model(**tester.get_inputs(), output_attentions=True).vision_model_output.attentions == ()
    features = model.get_image_features(tester.get_inputs()["pixel_values"], output_hidden_states=True)
    assert len(features.hidden_states) == 3
    tuples = model(**tester.get_inputs(), return_dict=False)
    assert isinstance(tuples[-1], tuple)  # nested outputs become tuples too, as CLIP's


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.__name__)
def test_retain_grad_on_hidden_states_and_attentions(tester, head_class):
    model = build_head(tester, head_class).train()
    model.set_attn_implementation("eager")
    out = _inspect(head_class, model, _inputs(head_class, tester, with_labels=True))
    tower = out if head_class is XModalForImageClassification else out.vision_model_output
    tensors = [tower.hidden_states[0], tower.attentions[0]]
    if head_class not in (XModalForImageClassification, XModalForConditionalGeneration):
        tensors += [out.text_model_output.hidden_states[0], out.text_model_output.attentions[0]]
        tensors += [out.multimodal_output.text_hidden_states[0], out.multimodal_output.text_cross_attentions[0]]
    for tensor in tensors:
        tensor.retain_grad()
    loss = out.loss
    if head_class is XModalModel:  # the contrastive loss does not read the fusion module (see _training_loss)
        loss = loss + out.multimodal_output.pooler_output.pow(2).mean()
    loss.backward()
    assert all(tensor.grad is not None for tensor in tensors)


# ------------------------------------------------------------------------------------------------ gradients


def _training_loss(head_class: type, model: torch.nn.Module, tester) -> torch.Tensor:
    torch.manual_seed(0)
    if head_class is XModalModel:
        # XModalModel's own loss is CLIP's contrastive loss; its fusion module is trained through multimodal_output
        out = model(**tester.get_inputs(), return_loss=True, return_multimodal_output=True)
        return out.loss + out.multimodal_output.pooler_output.pow(2).mean()
    return model(**_inputs(head_class, tester, with_labels=True)).loss


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_every_parameter_gets_a_gradient(tester, head_class, checkpointing):
    model = build_head(tester, head_class).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
    _training_loss(head_class, model, tester).backward()
    missing = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


# ------------------------------------------------------------------------------------------------ vocabularies


@pytest.mark.parametrize("head_class", VOCABULARY_HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_resize_token_embeddings_keeps_the_outputs_of_old_tokens(tester, tmp_path, head_class, tied):
    model = build_head(tester, head_class, tie_word_embeddings=tied).eval()
    inputs = _inputs(head_class, tester)
    before = _tensors(_seeded(model, inputs))
    new_size = tester.vocab_size + 8
    model.resize_token_embeddings(new_size)
    assert model.config.get_text_config().vocab_size == new_size
    if model.config.decoder_config is not None and getattr(model, "text_decoder", None) is not None:
        assert model.config.get_text_config(decoder=True).vocab_size == new_size
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is not None:
        assert output_embeddings.weight.shape[0] == new_size
        assert (output_embeddings.weight is model.get_input_embeddings().weight) == tied
    after = _tensors(_seeded(model, inputs))
    for name, value in before.items():
        vocabulary = after[name].shape[-1] == new_size and value.shape[-1] == tester.vocab_size
        torch.testing.assert_close(after[name][..., : tester.vocab_size] if vocabulary else after[name], value)
    inputs["input_ids"][0, 1] = new_size - 1
    expected = _tensors(_seeded(model, inputs))
    model.save_pretrained(tmp_path)
    reloaded = head_class.from_pretrained(tmp_path).eval()
    for name, value in _tensors(_seeded(reloaded, inputs)).items():
        assert torch.equal(value, expected[name]), name


def _seeded(model: torch.nn.Module, inputs: dict):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(**inputs)


def test_a_model_without_a_vocabulary_says_so(tester):
    model = build_head(tester, XModalForImageClassification)
    with pytest.raises(NotImplementedError, match="no token embeddings"):
        model.resize_token_embeddings(tester.vocab_size + 1)


# ------------------------------------------------------------------------------------------------ partial saves


def test_a_frozen_tower_save_reloads(tester, tmp_path):
    model = build_head(tester, XModalForPreTraining).train()
    model.vision_model.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _training_loss(XModalForPreTraining, model, tester).backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "full")
    reloaded, info = XModalForPreTraining.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    # a partial save of the trained parameters only: the tower is reported missing and initialised, the rest loads
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(tmp_path / "partial", state_dict=trained)
    partial, info = XModalForPreTraining.from_pretrained(tmp_path / "partial", output_loading_info=True)
    assert info["missing_keys"] and all(key.startswith("vision_model.") for key in info["missing_keys"])
    state = partial.state_dict()
    assert all(torch.equal(state[name], value) for name, value in trained.items())
    assert partial.mlm_head.decoder.weight is partial.text_model.embeddings.word_embeddings.weight


# --------------------------------------------------------------------------- inputs, prefixes, generation outputs


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.__name__)
def test_main_input_name_and_base_model_prefix(tester, head_class):
    first = list(inspect.signature(head_class.forward).parameters)[1]
    assert head_class.main_input_name == first
    model = build_head(tester, head_class)
    assert getattr(model, model.base_model_prefix) is model.base_model is model


def test_generation_outputs_and_the_old_cache_name(tester):
    model = build_head(tester, XModalForConditionalGeneration).eval()
    inputs = _inputs(XModalForConditionalGeneration, tester)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        assert isinstance(out, XModalForConditionalGenerationOutput)
        assert out.image_embeds.shape == (tester.batch_size, 1 + (tester.image_size // tester.patch_size) ** 2, 32)
        step = {"input_ids": inputs["input_ids"][:, -1:], "pixel_values": inputs["pixel_values"]}
        new_name = model(**step, cache=_copy(out.cache), use_cache=True).logits
        with pytest.warns(FutureWarning, match="past_key_values"):
            old_name = model(**step, past_key_values=_copy(out.cache), use_cache=True).logits
    torch.testing.assert_close(old_name, new_name)
    no_cache = model(**step).logits
    assert not torch.allclose(no_cache, new_name)


def _copy(cache: DynamicCache) -> DynamicCache:
    import copy

    return copy.deepcopy(cache)


# ------------------------------------------------------------------------------------------------ config


def test_config_round_trip_keeps_keys_and_no_local_path(tester, tmp_path):
    model = XModalModel(tester.get_config())
    model.save_pretrained(tmp_path / "first")
    reloaded = XModalModel.from_pretrained(tmp_path / "first")
    reloaded.save_pretrained(tmp_path / "second")
    first, second = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("first", "second"))
    assert first == second
    assert str(tmp_path) not in json.dumps(first)
    config = XModalConfig.from_pretrained(tmp_path / "first")
    assert config.name_or_path == ""
    assert config.to_dict().keys() == reloaded.config.to_dict().keys()
    assert all("_name_or_path" not in reloaded.config.to_dict()[key] for key in SUB_CONFIGS)
