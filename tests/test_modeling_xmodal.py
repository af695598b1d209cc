"""Model tests: shapes, save/load, padding, gradients, attention implementations, checkpointing, interpolation,
pretrained towers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    BertConfig,
    BertModel,
    ViTConfig,
    ViTModel,
)

from xmodal import XModalConfig, XModalForImageClassification, XModalModel, contrastive_loss

DIRECTIONS = ("text_to_image", "image_to_text", "both")


def _full_loss(model: XModalModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss that touches every parameter: the contrastive loss plus the fused representation."""
    out = model(**inputs, return_loss=True)
    fused = model.get_multimodal_features(**inputs)
    return out.loss + fused.pooler_output.pow(2).mean()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_output_shapes(tester, direction):
    tester.direction = direction
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    out = model(**inputs)
    b, p = tester.batch_size, tester.projection_dim
    assert out.logits_per_image.shape == (b, b)
    assert torch.equal(out.logits_per_text, out.logits_per_image.t())
    assert out.image_embeds.shape == out.text_embeds.shape == (b, p)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(b))
    assert out.loss is None
    num_tokens = 1 + (tester.image_size // tester.patch_size) ** 2
    assert out.vision_model_output.last_hidden_state.shape == (b, num_tokens, tester.hidden_size)
    assert out.text_model_output.last_hidden_state.shape == (b, tester.seq_length, tester.hidden_size)
    fused = model.get_multimodal_features(**inputs)
    assert fused.pooler_output.shape == (b, tester.hidden_size)
    assert fused.text_last_hidden_state.shape == (b, tester.seq_length, tester.hidden_size)
    assert fused.image_last_hidden_state.shape == (b, num_tokens, tester.hidden_size)
    assert model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.shape == (b, p)


def test_contrastive_loss_matches_formula(tester):
    model = XModalModel(tester.get_config()).eval()
    out = model(**tester.get_inputs(), return_loss=True)
    logits = out.logits_per_text
    n = logits.shape[0]
    by_hand = -0.5 * sum(logits[i].log_softmax(-1)[i] + logits[:, i].log_softmax(-1)[i] for i in range(n)) / n
    torch.testing.assert_close(out.loss, by_hand)
    torch.testing.assert_close(contrastive_loss(logits), by_hand)
    scale = math.exp(model.config.logit_scale_init_value)
    torch.testing.assert_close(logits, scale * out.text_embeds @ out.image_embeds.t())


def test_logit_scale_is_clamped(tester):
    model = XModalModel(tester.get_config()).eval()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(**tester.get_inputs())
    assert out.logits_per_text.abs().max() <= 100.0 + 1e-4


def test_tuple_output(tester):
    model = XModalModel(tester.get_config()).eval()
    out = model(**tester.get_inputs(), return_loss=True, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_padding_does_not_change_unpadded_items(tester, direction):
    tester.direction = direction
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs(padded=True)
    batched = model(**inputs)
    batched_fused = model.get_multimodal_features(**inputs)
    for row in range(tester.batch_size):
        length = int(inputs["attention_mask"][row].sum())
        single = {
            "input_ids": inputs["input_ids"][row : row + 1, :length],
            "attention_mask": inputs["attention_mask"][row : row + 1, :length],
            "pixel_values": inputs["pixel_values"][row : row + 1],
        }
        torch.testing.assert_close(model(**single).text_embeds[0], batched.text_embeds[row], atol=1e-5, rtol=1e-5)
        fused = model.get_multimodal_features(**single).pooler_output[0]
        torch.testing.assert_close(fused, batched_fused.pooler_output[row], atol=1e-5, rtol=1e-5)


def test_mean_pooling_ignores_padding(tester):
    model = XModalModel(tester.get_config(text_pooling="mean", vision_pooling="mean")).eval()
    inputs = tester.get_inputs(padded=True)
    batched = model(**inputs)
    length = int(inputs["attention_mask"][1].sum())
    single = model.get_text_features(input_ids=inputs["input_ids"][1:2, :length]).pooler_output
    torch.testing.assert_close(F.normalize(single, dim=-1)[0], batched.text_embeds[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_parameter_gets_a_finite_gradient(tester, direction):
    tester.direction = direction
    model = XModalModel(tester.get_config())
    loss = _full_loss(model, tester.get_inputs())
    assert torch.isfinite(loss)
    loss.backward()
    missing = [name for name, param in model.named_parameters() if param.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


def test_token_type_ids_default_to_segment_zero(tester):
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    with_types = model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]))
    torch.testing.assert_close(model(**inputs).logits_per_text, with_types.logits_per_text)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_eager_matches_sdpa(tester, direction):
    tester.direction = direction
    torch.manual_seed(0)
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    sdpa = (model(**inputs).logits_per_text, model.get_multimodal_features(**inputs).pooler_output)
    model.set_attn_implementation("eager")
    assert model.config.cross_config._attn_implementation == "eager"
    eager = (model(**inputs).logits_per_text, model.get_multimodal_features(**inputs).pooler_output)
    for a, b in zip(sdpa, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_loss_and_gradients(tester):
    torch.manual_seed(0)
    model = XModalModel(tester.get_config())
    inputs = tester.get_inputs()
    loss = _full_loss(model, inputs)
    loss.backward()
    reference = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = _full_loss(model, inputs)
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_position_interpolation(tester):
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    larger = torch.randn(2, 3, 2 * tester.image_size, 3 * tester.image_size // 2)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.get_image_features(pixel_values=larger)
    out = model.get_image_features(pixel_values=larger, interpolate_pos_encoding=True)
    grid = (2 * tester.image_size // tester.patch_size) * (3 * tester.image_size // 2 // tester.patch_size)
    assert out.last_hidden_state.shape == (2, 1 + grid, tester.hidden_size)
    assert torch.isfinite(out.pooler_output).all()
    # at the native resolution, interpolation is the identity
    native = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    same = model.get_image_features(pixel_values=inputs["pixel_values"], interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(native, same)


@pytest.mark.parametrize("size", [(16, 16), (18, 23)])
def test_patch_matmul_equals_the_convolution(tester, size):
    """The patch embedding is computed as a matmul over flattened patches; it must equal the stride-P convolution of
    the same weights, including the pixels a convolution drops beyond the last whole patch."""
    embeddings = XModalModel(tester.get_config()).vision_model.embeddings
    pixel_values = torch.randn(2, 3, *size, requires_grad=True)
    expected = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    actual = embeddings.embed_patches(pixel_values)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    weight = embeddings.patch_embedding.weight
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), weight)
    (actual_grad,) = torch.autograd.grad(actual.square().sum(), weight)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_input_errors_are_clear(tester):
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    with pytest.raises(ValueError, match="vocab_size"):
        model(**{**inputs, "input_ids": inputs["input_ids"] + tester.vocab_size})
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :1]})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.get_text_features(input_ids=torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="as many texts as images"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:2]}, return_loss=True)
    with pytest.raises(ValueError, match="Give pixel_values .*, input_ids .* or both"):
        model()
    with pytest.raises(ValueError, match="return_loss=True needs both pixel_values and input_ids"):
        model(pixel_values=inputs["pixel_values"], return_loss=True)


def test_one_modality_alone_gives_its_embeddings(tester):
    """What the image-feature-extraction and feature-extraction pipelines call: `output[0]` is the embeddings."""
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    texts = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        both = model(**inputs)
        image_only = model(pixel_values=inputs["pixel_values"])
        text_only = model(**texts)
    assert image_only.logits_per_image is None and image_only.text_embeds is None
    assert text_only.logits_per_text is None and text_only.image_embeds is None
    torch.testing.assert_close(image_only[0], both.image_embeds)
    torch.testing.assert_close(text_only[0], both.text_embeds)
    torch.testing.assert_close(
        image_only.vision_model_output.last_hidden_state, both.vision_model_output.last_hidden_state
    )


def test_images_against_a_different_number_of_texts(tester):
    """N images x K texts (the zero-shot call, CLIPProcessor semantics) score as a K x N matrix of the pairwise
    similarities; only the paired loss asks for equal counts."""
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    texts = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    for num_images in (1, 2):
        with torch.no_grad():
            out = model(**texts, pixel_values=inputs["pixel_values"][:num_images])
            image = F.normalize(model.get_image_features(inputs["pixel_values"][:num_images]).pooler_output, dim=-1)
            text = F.normalize(model.get_text_features(**texts).pooler_output, dim=-1)
        assert out.logits_per_text.shape == (tester.batch_size, num_images)
        torch.testing.assert_close(out.logits_per_text, model.logit_scale.exp() * text @ image.t())
        assert out.loss is None


def test_no_fusion_module(tester):
    config = tester.get_config(cross_config={"num_hidden_layers": 0})
    model = XModalModel(config).eval()
    assert model.cross_model is None
    assert model(**tester.get_inputs(), return_loss=True).loss.isfinite()
    with pytest.raises(ValueError, match="no fusion module"):
        model.get_multimodal_features(**tester.get_inputs())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_save_load_round_trip(tester, tmp_path, direction):
    tester.direction = direction
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    for auto_class in (AutoModel, AutoModelForZeroShotImageClassification):
        reloaded = auto_class.from_pretrained(tmp_path).eval()
        assert type(reloaded) is XModalModel
        assert torch.equal(reloaded(**inputs).logits_per_text, model(**inputs).logits_per_text)
        fused = reloaded.get_multimodal_features(**inputs).pooler_output
        assert torch.equal(fused, model.get_multimodal_features(**inputs).pooler_output)
    expected = {key: value for key, value in model.config.to_dict().items() if key != "_name_or_path"}
    reloaded_config = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert {key: value for key, value in reloaded_config.items() if key != "_name_or_path"} == expected


def test_image_classification_head(tester, tmp_path):
    XModalModel(tester.get_config()).save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=5)
    assert type(model) is XModalForImageClassification
    base = XModalModel.from_pretrained(tmp_path)
    torch.testing.assert_close(model.vision_model.state_dict(), base.vision_model.state_dict())
    inputs = tester.get_inputs()
    labels = torch.tensor([0, 4, 2])
    out = model(pixel_values=inputs["pixel_values"], labels=labels)
    assert out.logits.shape == (tester.batch_size, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert all(param.grad is not None for param in model.parameters())
    model.save_pretrained(tmp_path / "clf")
    reloaded = XModalForImageClassification.from_pretrained(tmp_path / "clf").eval()
    model.eval()
    torch.testing.assert_close(
        reloaded(pixel_values=inputs["pixel_values"]).logits, model(pixel_values=inputs["pixel_values"]).logits
    )


def test_pretrained_towers(tester, tmp_path):
    vit = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=16,
            patch_size=4,
        )
    ).eval()
    bert = BertModel(
        BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    ).eval()
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    model = XModalModel.from_vision_text_pretrained(
        str(tmp_path / "vit"),
        str(tmp_path / "bert"),
        projection_dim=16,
        cross_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
    ).eval()
    assert model.config.vision_config.model_type == "vit" and model.config.text_config.model_type == "bert"
    inputs = tester.get_inputs()
    # the towers carry the pretrained weights: identical hidden states
    with torch.no_grad():
        expected_text = bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        expected_image = vit(pixel_values=inputs["pixel_values"]).last_hidden_state
    out = model(**inputs, return_loss=True)
    torch.testing.assert_close(out.text_model_output.last_hidden_state, expected_text)
    torch.testing.assert_close(out.vision_model_output.last_hidden_state, expected_image)
    assert model.get_multimodal_features(**inputs).pooler_output.shape == (tester.batch_size, 32)
    # and the composite round-trips through save/load
    model.save_pretrained(tmp_path / "xmodal")
    reloaded = XModalModel.from_pretrained(tmp_path / "xmodal").eval()
    torch.testing.assert_close(reloaded(**inputs).logits_per_text, out.logits_per_text)
    # an xmodal checkpoint can itself provide a tower
    again = XModalModel.from_vision_text_pretrained(str(tmp_path / "xmodal"), bert, projection_dim=16).eval()
    torch.testing.assert_close(
        again.get_image_features(pixel_values=inputs["pixel_values"]).last_hidden_state, expected_image
    )


def test_config_validation_errors():
    cases = [
        ({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}, "hidden_size \\(30\\) must be divisible"),
        ({"vision_config": {"image_size": 64, "patch_size": 6}}, "patch_size \\(6\\) must divide image_size"),
        ({"vision_config": {"num_hidden_layers": 0}}, "num_hidden_layers must be a positive integer, got 0"),
        ({"text_config": {"vocab_size": -1}}, "vocab_size must be a positive integer"),
        ({"text_config": {"hidden_act": "swishy"}}, "hidden_act 'swishy' is unknown"),
        ({"text_config": {"hidden_dropout_prob": 1.5}}, "hidden_dropout_prob must be a float in"),
        ({"cross_config": {"direction": "sideways"}}, "direction 'sideways' is unknown; accepted: text_to_image"),
        ({"projection_dim": 0}, "projection_dim must be a positive integer, got 0"),
        ({"text_pooling": "max"}, "text_pooling 'max' is unknown"),
        ({"itm_loss_weight": -1.0}, "itm_loss_weight must be a non-negative number"),
        ({"vision_config": {"model_type": "not-a-model"}}, "unknown model_type 'not-a-model'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            XModalConfig(**kwargs)


def test_presets():
    assert set(XModalConfig.available_presets()) >= {"tiny", "small", "base"}
    tiny = XModalConfig.from_preset("tiny")
    assert (tiny.vision_config.image_size, tiny.vision_config.patch_size) == (64, 8)
    assert tiny.vision_config.hidden_size == 256 and tiny.vision_config.num_hidden_layers == 4
    base = XModalConfig.from_preset("base")
    assert (base.vision_config.hidden_size, base.text_config.hidden_size, base.vision_config.image_size) == (
        768,
        768,
        224,
    )
    overridden = XModalConfig.from_preset("tiny", text_config={"vocab_size": 1000}, projection_dim=64)
    assert overridden.text_config.vocab_size == 1000 and overridden.text_config.hidden_size == 256
    assert overridden.projection_dim == 64
    with pytest.raises(ValueError, match="available presets: base, small, tiny"):
        XModalConfig.from_preset("huge")


def test_clip_tower_style_is_clip_at_the_preset_sizes():
    bert, clip = (
        XModalConfig.from_preset("tiny"),
        XModalConfig.from_preset("tiny", "clip", text_config={"vocab_size": 90}),
    )
    assert (clip.vision_config.hidden_size, clip.text_config.num_hidden_layers) == (256, 4)
    assert (
        clip.text_config.vocab_size == 90 and clip.text_config.is_causal and not clip.text_config.embedding_layernorm
    )
    assert clip.vision_config.pre_layernorm and (clip.vision_pooling, clip.text_pooling) == ("cls", "eos")
    assert clip.vision_config.initialization == clip.text_config.initialization == "clip"
    assert not bert.text_config.is_causal and bert.text_config.initialization == "normal"
    with pytest.raises(ValueError, match="Unknown tower_style 'siglip'; accepted: bert, clip"):
        XModalConfig.from_preset("tiny", "siglip")


def test_config_round_trip(tmp_path):
    config = XModalConfig.from_preset("tiny", cross_config={"direction": "both"})
    config.save_pretrained(tmp_path)
    reloaded = XModalConfig.from_pretrained(tmp_path)
    without_path = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(reloaded) == without_path(config)
    assert reloaded.cross_config.direction == "both"


def test_contrastive_forward_compiles_without_graph_breaks(tester):
    """torch.compile traces the contrastive forward (padded texts included) as one graph: input checks that need tensor
    values and the all-unpadded fast path are skipped under compilation, not broken around."""
    model = XModalModel(tester.get_config())
    explanation = torch._dynamo.explain(model)(**tester.get_inputs(padded=True), return_loss=True)
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]
    assert explanation.graph_count == 1
