"""Bad input at the model boundary: wrong types, shapes and dtypes, token ids outside the vocabulary, resolutions
that need `interpolate_pos_encoding`, empty batches and masks of another shape. Each gets a clear `TypeError` or
`ValueError` raised before any tensor reaches the towers (never an IndexError or a reshape error deep in torch)."""

from __future__ import annotations

import pytest
import torch
from conftest import XModalModelTester
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xmodal import (
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForMaskedLM,
    XModalModel,
)


@pytest.fixture(scope="module")
def model() -> XModalModel:
    torch.manual_seed(0)
    return XModalModel(XModalModelTester().get_config()).eval()


@pytest.fixture
def inputs(tester) -> dict[str, torch.Tensor]:
    return tester.get_inputs()


def _run(model: torch.nn.Module, **inputs: object) -> object:
    with torch.no_grad():
        return model(**{key: value for key, value in inputs.items() if value is not None})


# ---------------------------------------------------------------- pixel_values


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda p: p[0],
            ValueError,
            r"pixel_values must have shape \(batch_size, 3, height, width\), got \(3, 16, 16\)"
            r"\. A single image needs a batch dimension",
        ),
        (lambda p: p[None], ValueError, r"got \(1, 3, 3, 16, 16\)"),
        (lambda p: p.permute(0, 2, 3, 1), ValueError, r"got \(3, 16, 16, 3\)\. It looks channels-last"),
        (lambda p: p[:, :1], ValueError, r"got \(3, 1, 16, 16\)"),
        (
            lambda p: (p * 100).to(torch.uint8),
            TypeError,
            r"floating-point tensor of normalised pixels, got dtype "
            r"torch.uint8: raw integer or boolean pixels must go through the image processor",
        ),
        (lambda p: p.long(), TypeError, r"got dtype torch.int64"),
        (lambda p: p > 0, TypeError, r"got dtype torch.bool"),
        (lambda p: p.numpy(), TypeError, r"pixel_values must be a torch.Tensor .* got a ndarray"),
        (lambda p: p.tolist(), TypeError, r"got a list"),
        (lambda p: p[:0], ValueError, r"pixel_values is empty \(shape \(0, 3, 16, 16\)\)"),
        (
            lambda p: torch.randn(3, 3, 32, 32),
            ValueError,
            r"Input image size \(32x32\) doesn't match the model "
            r"\(16x16\); resize the image or pass interpolate_pos_encoding=True",
        ),
    ],
    ids=["3d", "5d", "channels-last", "1-channel", "uint8", "int64", "bool", "numpy", "list", "empty", "resolution"],
)
def test_bad_pixel_values(model, inputs, make, error, match) -> None:
    with pytest.raises(error, match=match):
        _run(model, **{**inputs, "pixel_values": make(inputs["pixel_values"])})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_cast_to_the_weights(model, inputs, dtype) -> None:
    reference = _run(model, **inputs).logits_per_image
    other = _run(model, **{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}).logits_per_image
    assert other.dtype == torch.float32
    torch.testing.assert_close(other, reference, atol=0.05 if dtype != torch.float64 else 1e-5, rtol=0)


def test_resolution_needs_interpolate_pos_encoding_and_then_works(model, inputs) -> None:
    for height, width in ((32, 32), (16, 40), (24, 16)):
        images = torch.randn(2, 3, height, width)
        with pytest.raises(ValueError, match=rf"\({height}x{width}\).*interpolate_pos_encoding=True"):
            model.get_image_features(pixel_values=images)
        features = model.get_image_features(pixel_values=images, interpolate_pos_encoding=True)
        assert features.last_hidden_state.shape == (2, 1 + (height // 4) * (width // 4), 32)
        assert torch.isfinite(features.pooler_output).all()
    with pytest.raises(ValueError, match=r"Input image size \(2x2\) is smaller than the patch size 4"):
        model.get_image_features(pixel_values=torch.randn(1, 3, 2, 2), interpolate_pos_encoding=True)


# ---------------------------------------------------------------- text inputs


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"input_ids": lambda i: i.float()},
            TypeError,
            r"input_ids must be an integer tensor \(int64 or int32\), "
            r"got dtype torch.float32",
        ),
        ({"input_ids": lambda i: i.to(torch.int16)}, TypeError, r"got dtype torch.int16"),
        ({"input_ids": lambda i: i > 0}, TypeError, r"got dtype torch.bool"),
        (
            {"input_ids": lambda i: i[0]},
            ValueError,
            r"input_ids must have shape \(batch_size, sequence_length\), got "
            r"\(7,\)",
        ),
        ({"input_ids": lambda i: i.tolist()}, TypeError, r"input_ids must be a torch.Tensor, got a list"),
        (
            {"input_ids": lambda i: i[:0], "attention_mask": lambda m: m[:0]},
            ValueError,
            r"input_ids is empty \(shape \(0, 7\)\)",
        ),
        (
            {"input_ids": lambda i: i[:, :0], "attention_mask": lambda m: m[:, :0]},
            ValueError,
            r"input_ids is empty \(shape \(3, 0\)\)",
        ),
        (
            {"attention_mask": lambda m: m[:, :5]},
            ValueError,
            r"attention_mask must have the shape of the tokens "
            r"\(3, 7\), got \(3, 5\)",
        ),
        ({"attention_mask": lambda m: m[:2]}, ValueError, r"got \(2, 7\)"),
        ({"attention_mask": lambda m: m[:, None]}, ValueError, r"got \(3, 1, 7\)"),
        ({"attention_mask": lambda m: m.numpy()}, TypeError, r"attention_mask must be a torch.Tensor"),
        (
            {"token_type_ids": lambda m: torch.zeros(3, 4, dtype=torch.long)},
            ValueError,
            r"token_type_ids must have the shape of the tokens \(3, 7\), got \(3, 4\)",
        ),
        (
            {"token_type_ids": lambda m: torch.full((3, 7), 2)},
            ValueError,
            r"token_type_ids hold ids from 2 to 2 \(max id 2\); the text tower accepts \[0, 2\) \(type_vocab_size=2\)",
        ),
        ({"token_type_ids": lambda m: torch.zeros(3, 7)}, TypeError, r"token_type_ids must be an integer tensor"),
        (
            {"position_ids": lambda m: torch.arange(7)[None] + 30},
            ValueError,
            r"position_ids hold ids from 30 to 36 .* \[0, 32\) \(max_position_embeddings=32\)",
        ),
        (
            {"position_ids": lambda m: torch.arange(5)[None]},
            ValueError,
            r"position_ids must have shape \(3, 7\) or "
            r"\(1, 7\), got \(1, 5\)",
        ),
        (
            {"input_ids": lambda i: torch.ones(3, 40, dtype=torch.long), "attention_mask": lambda m: None},
            ValueError,
            r"Sequence length 40 exceeds max_position_embeddings=32; truncate the text",
        ),
    ],
    ids=[
        "float-ids",
        "int16-ids",
        "bool-ids",
        "1d-ids",
        "list-ids",
        "empty-batch",
        "empty-sequence",
        "mask-columns",
        "mask-rows",
        "mask-3d",
        "mask-numpy",
        "types-shape",
        "types-range",
        "types-float",
        "positions-range",
        "positions-shape",
        "too-long",
    ],
)
def test_bad_text_inputs(model, inputs, change, error, match) -> None:
    changed = dict(inputs)
    for key, make in change.items():
        changed[key] = make(inputs.get(key, inputs["attention_mask"]))
    with pytest.raises(error, match=match):
        _run(model, **changed)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 10),
    low=st.integers(-5, 110),
    span=st.integers(0, 20),
    dtype=st.sampled_from([torch.int64, torch.int32]),
    seed=st.integers(0, 2**16),
)
def test_token_ids_out_of_the_vocabulary_name_the_max_id_and_the_vocab_size(
    model, batch, length, low, span, dtype, seed
) -> None:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(low, low + span + 1, (batch, length), generator=generator, dtype=torch.int64).to(dtype)
    lowest, highest = int(input_ids.min()), int(input_ids.max())
    if lowest < 0 or highest >= 99:
        with pytest.raises(
            ValueError,
            match=rf"input_ids hold ids from {lowest} to {highest} \(max id {highest}\);"
            r" the text tower accepts \[0, 99\) \(vocab_size=99\)",
        ):
            model.get_text_features(input_ids=input_ids)
    else:
        features = model.get_text_features(input_ids=input_ids)
        assert features.pooler_output.shape == (batch, 24) and torch.isfinite(features.pooler_output).all()


def test_int32_ids_give_the_int64_result(model, inputs) -> None:
    reference = _run(model, **inputs).logits_per_text
    narrow = {**inputs, "input_ids": inputs["input_ids"].int(), "attention_mask": inputs["attention_mask"].int()}
    torch.testing.assert_close(_run(model, **narrow).logits_per_text, reference)


def test_bool_and_float_attention_masks_give_the_integer_mask_result(model, inputs) -> None:
    reference = _run(model, **inputs).logits_per_text
    for mask in (inputs["attention_mask"].bool(), inputs["attention_mask"].float()):
        torch.testing.assert_close(_run(model, **{**inputs, "attention_mask": mask}).logits_per_text, reference)


# ---------------------------------------------------------------- every head checks at its boundary


def test_heads_check_their_inputs_too(tester, inputs) -> None:
    config = tester.get_config()
    classifier = XModalForImageClassification(config).eval()
    with pytest.raises(TypeError, match="floating-point tensor of normalised pixels"):
        classifier(pixel_values=(inputs["pixel_values"] * 50).to(torch.uint8))
    with pytest.raises(ValueError, match="pixel_values is empty"):
        classifier(pixel_values=inputs["pixel_values"][:0])
    masked_lm = XModalForMaskedLM(config).eval()
    with pytest.raises(ValueError, match=r"max id 120\); the text tower accepts \[0, 99\)"):
        masked_lm(**{**inputs, "input_ids": torch.full_like(inputs["input_ids"], 120)})
    captioner = XModalForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="pixel_values is empty"):
        captioner.generate(pixel_values=inputs["pixel_values"][:0], max_new_tokens=2)
    with pytest.raises(
        ValueError,
        match=r"decoder input_ids hold ids from 500 to 500 \(max id 500\); the captioning decoder accepts \[0, 99\)",
    ):
        captioner(input_ids=torch.full((3, 2), 500), pixel_values=inputs["pixel_values"])


def test_an_external_bert_text_tower_gets_the_same_checks(tester, inputs) -> None:
    config = tester.get_config(
        text_config={
            "model_type": "bert",
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "max_position_embeddings": 32,
        }
    )
    model = XModalModel(config).eval()
    assert type(model.text_model).__name__ == "BertModel"
    assert _run(model, **inputs).logits_per_text.shape == (3, 3)
    with pytest.raises(ValueError, match=r"max id 150\); the text tower accepts \[0, 99\) \(vocab_size=99\)"):
        _run(model, **{**inputs, "input_ids": torch.full_like(inputs["input_ids"], 150)})
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of the tokens"):
        _run(model, **{**inputs, "attention_mask": inputs["attention_mask"][:, :3]})
    with pytest.raises(ValueError, match=r"Sequence length 40 exceeds max_position_embeddings=32"):
        model.get_text_features(input_ids=torch.ones(1, 40, dtype=torch.long))
