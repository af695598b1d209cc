"""`XModalModel.from_clip`: a transformers CLIPModel (tiny, random, made here) converted into xmodal's built-in towers
gives CLIP's image and text embeddings and logits to 1e-5; the CLIP switches of the towers (image pre-LayerNorm, no
text embedding LayerNorm, causal text attention, [EOS] pooling) behave as documented."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from xmodal import XModalConfig, XModalForPreTraining, XModalModel

EOS, PAD = 98, 1


def tiny_clip(seed: int = 0) -> CLIPModel:
    """A CLIPModel of the tester's sizes with every weight random (LayerNorms and biases too, so that a weight
    mapped to the wrong place shows)."""
    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": 99,
            "max_position_embeddings": 16,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
            "bos_token_id": 97,
        },
        vision_config={**tower, "image_size": 30, "patch_size": 6},
        projection_dim=24,
    )
    model = CLIPModel(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def clip_text(pad: int = PAD) -> dict[str, torch.Tensor]:
    """Right-padded captions of 3 to 9 tokens, [EOS] last, as CLIP's tokenizer gives them."""
    generator = torch.Generator().manual_seed(1)
    lengths = [9, 5, 3, 7]
    input_ids = torch.full((len(lengths), 9), pad)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, : length - 1] = torch.randint(3, 97, (length - 1,), generator=generator)
        input_ids[row, length - 1] = EOS
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("pad", [PAD, EOS], ids=["pad_token", "eos_as_pad"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_from_clip_reproduces_clip_embeddings_and_logits(pad: int, attn_implementation: str) -> None:
    clip = tiny_clip()
    model = XModalModel.from_clip(clip, attn_implementation=attn_implementation)
    pixel_values = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    text = clip_text(pad)
    with torch.no_grad():
        expected_image = clip.get_image_features(pixel_values=pixel_values).pooler_output
        expected_text = clip.get_text_features(**text).pooler_output
        expected = clip(**text, pixel_values=pixel_values)
        image = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_features = model.get_text_features(**text).pooler_output
        outputs = model(**text, pixel_values=pixel_values)
    torch.testing.assert_close(image, expected_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_features, expected_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs.logits_per_image, expected.logits_per_image, rtol=1e-5, atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(clip.logit_scale.item())


def test_from_clip_builds_heads_and_takes_overrides(tmp_path) -> None:
    clip = tiny_clip()
    model = XModalForPreTraining.from_clip(
        clip, cross_config={"num_hidden_layers": 1}, text_config={"drop_path_rate": 0.1}
    )
    assert model.config.cross_config.num_hidden_layers == 1 and model.config.text_config.drop_path_rate == 0.1
    assert model.config.text_config.is_causal and model.config.vision_config.pre_layernorm
    assert model.config.vision_config.initialization == model.config.text_config.initialization == "clip"
    torch.testing.assert_close(model.visual_projection.weight, clip.visual_projection.weight)
    # the converted model saves and reloads like any other
    model.save_pretrained(tmp_path)
    reloaded = XModalModel.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=pixel_values).pooler_output
        torch.testing.assert_close(reloaded.get_image_features(pixel_values).pooler_output, expected)


def test_from_clip_refuses_other_models() -> None:
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37))
    with pytest.raises(ValueError, match="from_clip needs a CLIPModel \\(model_type 'clip'\\), got 'vit'"):
        XModalModel.from_clip(vit)


def test_causal_text_tower_sees_only_the_past(tester) -> None:
    config = tester.get_config(text_config={"is_causal": True, "embedding_layernorm": False}, text_pooling="eos")
    model = XModalModel(config).eval()
    inputs = tester.get_inputs()
    changed = inputs["input_ids"].clone()
    changed[0, -1] = (changed[0, -1] + 1) % tester.vocab_size  # the last token of the unpadded caption
    with torch.no_grad():
        before = model.text_model(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
        after = model.text_model(changed, inputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(after[0, :-1], before[0, :-1])  # no earlier token moved
    assert not torch.allclose(after[0, -1], before[0, -1])
    assert model.text_model.embeddings.layer_norm is None


def test_eos_pooling_takes_the_last_real_token_with_either_padding() -> None:
    from xmodal.towers import _pool

    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert _pool(hidden, "eos", right).flatten().tolist() == [1.0, 7.0]
    assert _pool(hidden, "eos", left).flatten().tolist() == [3.0, 7.0]
    assert _pool(hidden, "eos").flatten().tolist() == [3.0, 7.0]


def test_config_switches_are_checked() -> None:
    with pytest.raises(ValueError, match="vision_pooling 'eos' is unknown; accepted: cls, mean"):
        XModalConfig(vision_pooling="eos")
    with pytest.raises(TypeError, match="XModalTextConfig.is_causal must be true or false"):
        XModalConfig(text_config={"is_causal": "yes"})
    with pytest.raises(TypeError, match="XModalVisionConfig.pre_layernorm must be true or false"):
        XModalConfig(vision_config={"pre_layernorm": 1})


def test_clip_initialization_scales_the_tower_weights_and_survives_a_reload(tmp_path) -> None:
    clip_towers = {"initialization": "clip", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
    config = XModalConfig(vision_config=clip_towers, text_config=clip_towers, projection_dim=64)
    torch.manual_seed(0)
    model = XModalModel(config)
    width, depth = 256, 4
    layer = model.text_model.encoder.layers[1]
    expected = {
        layer.self_attn.qkv_proj.weight: width**-0.5 * (2 * depth) ** -0.5,
        layer.self_attn.out_proj.weight: width**-0.5,
        layer.mlp.fc1.weight: (2 * width) ** -0.5,
        layer.mlp.fc2.weight: width**-0.5 * (2 * depth) ** -0.5,
        model.visual_projection.weight: width**-0.5,
        model.text_projection.weight: width**-0.5,
    }
    for weight, std in expected.items():
        assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert float(layer.self_attn.qkv_proj.bias.detach().abs().max()) == 0.0
    # the default stays N(0, 0.02)
    normal = XModalModel(XModalConfig(vision_config={**clip_towers, "initialization": "normal"}, projection_dim=64))
    assert normal.vision_model.encoder.layers[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    model.save_pretrained(tmp_path)
    reloaded = XModalModel.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    with pytest.raises(ValueError, match="initialization 'xavier' is unknown; accepted: normal, clip"):
        XModalConfig(text_config={"initialization": "xavier"})
