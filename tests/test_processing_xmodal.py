"""Tests for xmodal.processing: image processor, tokenizer training and the combined processor."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, BertTokenizer

from xmodal.processing import XModalImageProcessor, XModalProcessor, load_tokenizer, train_tokenizer

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CAPTIONS = [
    "a red cube on a wooden table",
    "two blue spheres next to a green cone",
    "a small yellow cylinder",
    "three red cubes and one blue sphere",
    "the green cone is behind the yellow cube",
]


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return train_tokenizer(CAPTIONS * 4, vocab_size=200, model_max_length=16)


@pytest.fixture(scope="module")
def processor(tokenizer: BertTokenizer) -> XModalProcessor:
    return XModalProcessor(image_processor=XModalImageProcessor(), tokenizer=tokenizer)


def raw_rgb(image: object, **kwargs) -> np.ndarray:
    """The (3, H, W) uint8 RGB pixels the processor sees: no resize, rescale or normalisation."""
    processor = XModalImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    return processor(image, return_tensors="np", **kwargs)["pixel_values"][0]


def random_rgb(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------- image processor: outputs and values


def test_defaults_shape_and_dtype() -> None:
    processor = XModalImageProcessor()
    assert processor.size == {"height": 224, "width": 224}
    assert processor.resample == PIL.Image.Resampling.BICUBIC
    assert processor.do_center_crop is False and processor.do_convert_rgb is True
    assert processor.rescale_factor == pytest.approx(1 / 255)
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(processor.image_std) == (0.229, 0.224, 0.225)

    images = [PIL.Image.fromarray(random_rgb(seed=i)) for i in range(2)]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 224, 224) and pixel_values.dtype == torch.float32
    as_list = processor(images)["pixel_values"]
    assert len(as_list) == 2 and as_list[0].shape == (3, 224, 224) and as_list[0].dtype == np.float32


def test_known_pixel_is_normalised_by_hand() -> None:
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 1] = (255, 128, 0)
    pixel_values = XModalImageProcessor(do_resize=False)(image, return_tensors="np")["pixel_values"]
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    np.testing.assert_allclose(pixel_values[0, :, 0, 1], expected, rtol=1e-5)
    np.testing.assert_allclose(pixel_values[0, :, 1, 1], -MEAN / STD, rtol=1e-5)


def test_solid_image_stays_solid_after_resize() -> None:
    image = PIL.Image.new("RGB", (37, 91), (10, 200, 30))
    pixel_values = XModalImageProcessor()(image, return_tensors="np")["pixel_values"][0]
    expected = (np.array([10, 200, 30]) / 255 - MEAN) / STD
    np.testing.assert_allclose(pixel_values, np.broadcast_to(expected[:, None, None], (3, 224, 224)), rtol=1e-5)


def test_center_crop_and_per_call_overrides() -> None:
    processor = XModalImageProcessor(size={"height": 64, "width": 64}, do_center_crop=True, crop_size=32)
    assert processor(PIL.Image.new("RGB", (100, 50)), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    out = processor(PIL.Image.new("RGB", (100, 50)), do_center_crop=False, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 64, 64)


def test_image_processor_save_and_load(tmp_path) -> None:
    processor = XModalImageProcessor(size={"height": 96, "width": 64}, do_center_crop=True, crop_size=48)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = XModalImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    image = PIL.Image.fromarray(random_rgb())
    before, after = processor(image, return_tensors="pt"), reloaded(image, return_tensors="pt")
    assert torch.equal(before["pixel_values"], after["pixel_values"])


# ---------------------------------------------------------------- image processor: modes and input types


def _palette_with_transparent_index() -> PIL.Image.Image:
    image = PIL.Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    return image


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (PIL.Image.new("1", (2, 1), 1), (255, 255, 255)),
        (PIL.Image.new("L", (2, 1), 100), (100, 100, 100)),
        (PIL.Image.new("RGB", (2, 1), (1, 2, 3)), (1, 2, 3)),
        (PIL.Image.new("RGBA", (2, 1), (255, 0, 0, 0)), (255, 255, 255)),
        (PIL.Image.new("RGBA", (2, 1), (0, 0, 0, 255)), (0, 0, 0)),
        (PIL.Image.new("RGBA", (2, 1), (255, 0, 0, 128)), (255, 127, 127)),
        (PIL.Image.new("LA", (2, 1), (0, 0)), (255, 255, 255)),
        (PIL.Image.new("LA", (2, 1), (40, 255)), (40, 40, 40)),
        (PIL.Image.new("CMYK", (2, 1), (0, 255, 255, 0)), (255, 0, 0)),
        (PIL.Image.new("CMYK", (2, 1), (0, 0, 0, 0)), (255, 255, 255)),
        (PIL.Image.new("RGB", (2, 1), (200, 10, 10)).convert("P"), (204, 0, 0)),
        (PIL.Image.fromarray(np.full((1, 2), 25700, dtype=np.uint16)), (100, 100, 100)),
        (PIL.Image.fromarray(np.full((1, 2), 65535, dtype=np.uint16)), (255, 255, 255)),
        (PIL.Image.fromarray(np.full((1, 2), 25700, dtype=np.int32)), (100, 100, 100)),
        (PIL.Image.fromarray(np.full((1, 2), 100, dtype=np.int32)), (100, 100, 100)),
        (PIL.Image.fromarray(np.full((1, 2), 0.5, dtype=np.float32)), (128, 128, 128)),
        (PIL.Image.fromarray(np.full((1, 2), 100.0, dtype=np.float32)), (100, 100, 100)),
    ],
    ids=lambda value: value.mode if isinstance(value, PIL.Image.Image) else None,
)
def test_every_pil_mode_converts_to_rgb(image: PIL.Image.Image, expected: tuple[int, int, int]) -> None:
    pixels = raw_rgb(image)
    assert pixels.shape == (3, 1, 2) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[:, 0, 0], expected)


def test_palette_transparency_becomes_white() -> None:
    pixels = raw_rgb(_palette_with_transparent_index())
    np.testing.assert_array_equal(pixels[:, 0, 0], (255, 0, 0))
    np.testing.assert_array_equal(pixels[:, 0, 1], (255, 255, 255))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_gradient_is_scaled_not_clipped(mode: str) -> None:
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16 if mode == "I;16" else np.int32)
    image = PIL.Image.fromarray(values)
    assert image.mode == mode
    pixels = raw_rgb(image)
    assert pixels.min() == 0 and pixels.max() == 255
    assert 100 < pixels.mean() < 155  # a linear ramp averages mid-grey; PIL's own convert("RGB") gives ~all white
    np.testing.assert_array_equal(pixels[0], np.round(values / 257).astype(np.uint8))


def test_numpy_and_torch_layouts_agree() -> None:
    hwc = random_rgb()
    reference = raw_rgb(PIL.Image.fromarray(hwc))
    np.testing.assert_array_equal(reference, hwc.transpose(2, 0, 1))
    inputs = {
        "numpy HWC": hwc,
        "numpy CHW": hwc.transpose(2, 0, 1).copy(),
        "numpy float HWC": hwc.astype(np.float32) / 255,
        "torch CHW": torch.from_numpy(hwc).permute(2, 0, 1),
        "torch HWC": torch.from_numpy(hwc),
        "torch float CHW": torch.from_numpy(hwc).permute(2, 0, 1).float() / 255,
        "torch int64 CHW": torch.from_numpy(hwc).permute(2, 0, 1).long(),
        "uint16 HWC": hwc.astype(np.uint16) * 257,
    }
    for name, image in inputs.items():
        np.testing.assert_array_equal(raw_rgb(image), reference, err_msg=name)


def test_ambiguous_layout_follows_input_data_format() -> None:
    chw = random_rgb(4, 4).transpose(2, 0, 1).copy()  # (3, 4, 4): numpy arrays default to (H, W, C)
    np.testing.assert_array_equal(raw_rgb(chw, input_data_format="channels_first"), chw)
    np.testing.assert_array_equal(raw_rgb(torch.from_numpy(chw)), chw)


def test_gray_and_alpha_arrays() -> None:
    gray = np.full((5, 6), 70, dtype=np.uint8)
    np.testing.assert_array_equal(raw_rgb(gray), np.full((3, 5, 6), 70))
    np.testing.assert_array_equal(raw_rgb(gray[None]), np.full((3, 5, 6), 70))
    rgba = np.zeros((5, 6, 4), dtype=np.uint8)
    np.testing.assert_array_equal(raw_rgb(rgba), np.full((3, 5, 6), 255))  # fully transparent -> white
    rgba[..., 3] = 255
    np.testing.assert_array_equal(raw_rgb(rgba), np.zeros((3, 5, 6)))


def test_batches_and_mixed_lists() -> None:
    processor = XModalImageProcessor(size={"height": 32, "width": 32})
    batch = torch.rand(3, 3, 40, 50)
    assert processor(batch, return_tensors="pt")["pixel_values"].shape == (3, 3, 32, 32)
    mixed = [PIL.Image.new("L", (9, 9)), random_rgb(), torch.rand(3, 8, 8), np.zeros((2, 10, 10, 3), np.uint8)]
    assert processor(mixed, return_tensors="pt")["pixel_values"].shape == (5, 3, 32, 32)


# ---------------------------------------------------------------- image processor: bad inputs


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("not_an_image.jpg", TypeError, r"images is a str 'not_an_image.jpg', which is not an image.*PIL.Image.open"),
        (42, TypeError, r"images is a int 42, which is not an image; expected a PIL.Image.Image"),
        (None, TypeError, r"images is a NoneType None, which is not an image"),
        ([PIL.Image.new("RGB", (2, 2)), "x"], TypeError, r"images\[1\] is a str 'x'"),
        ([], ValueError, r"Received an empty list of images; expected a PIL.Image.Image"),
        (np.zeros((0, 3, 3, 3), np.uint8), ValueError, r"empty batch of images"),
        (PIL.Image.new("RGB", (0, 5)), ValueError, r"zero-sized PIL image \(0x5\)"),
        (np.zeros((0, 7, 3), np.uint8), ValueError, r"zero-sized image: ndarray of shape \(0, 7, 3\)"),
        (np.zeros(5, np.uint8), ValueError, r"ndarray of shape \(5,\).*no image layout"),
        (
            np.zeros((7, 7, 7), np.uint8),
            ValueError,
            r"Cannot find the channel dimension of an image of shape \(7, 7, 7\)",
        ),
        (
            np.full((4, 4, 3), 300.0, np.float32),
            ValueError,
            r"values in \[0, 1\] \(or \[0, 255\]\); got values in \[300.0, 300.0\]",
        ),
        (np.full((4, 4, 3), np.nan, np.float32), ValueError, r"NaN or infinite"),
        (np.full((4, 4, 3), -1, np.int32), ValueError, r"negative values"),
        (np.zeros((4, 4, 3), np.complex64), TypeError, r"Unsupported pixel dtype complex64"),
    ],
    ids=lambda value: None,
)
def test_bad_image_inputs_raise_helpful_errors(bad: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        XModalImageProcessor()(bad)


# ---------------------------------------------------------------- image processor: property test


def _make_image(mode: str, kind: str, height: int, width: int, seed: int) -> object:
    rng = np.random.default_rng(seed)
    if kind == "numpy HWC":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "torch CHW float":
        return torch.from_numpy(rng.random((3, height, width), dtype=np.float32))
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return PIL.Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.int32))
    if mode == "F":
        return PIL.Image.fromarray(rng.random((height, width), dtype=np.float32))
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]),
    kind=st.sampled_from(["PIL", "PIL", "PIL", "numpy HWC", "torch CHW float"]),
    seed=st.integers(0, 2**16),
)
def test_any_size_and_mode_gives_finite_fixed_shape(height: int, width: int, mode: str, kind: str, seed: int) -> None:
    image = _make_image(mode, kind, height, width, seed)
    pixel_values = XModalImageProcessor()(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224) and pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()
    low, high = torch.from_numpy(-MEAN / STD)[:, None, None], torch.from_numpy((1 - MEAN) / STD)[:, None, None]
    assert (pixel_values[0] >= low - 1e-4).all() and (pixel_values[0] <= high + 1e-4).all()


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_knows_its_words(tokenizer: BertTokenizer) -> None:
    assert isinstance(tokenizer, BertTokenizer) and tokenizer.model_max_length == 16
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.convert_tokens_to_ids(special) == [0, 1, 2, 3, 4]
    assert len(tokenizer) > 20
    ids = tokenizer("A Red CUBE")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_tokens_to_ids("cube") != tokenizer.unk_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red cube"


def test_tokenizer_save_and_auto_reload(tokenizer: BertTokenizer, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is BertTokenizer and reloaded.model_max_length == 16
    texts = CAPTIONS + ["an unseen zebra, quite Purple!", ""]
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert load_tokenizer(tmp_path)(texts)["input_ids"] == tokenizer(texts)["input_ids"]


def test_load_tokenizer_rejects_special_tokens_only_vocabulary(tmp_path) -> None:
    BertTokenizer().save_pretrained(tmp_path)  # what `BertTokenizer(vocab_file=...)` silently builds in transformers 5
    with pytest.raises(ValueError, match=r"has only 5 tokens, all special"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"texts": []}, r"`texts` is empty"),
        ({"texts": ["", "  "]}, r"`texts` is empty"),
        ({"texts": "a red cube"}, r"iterable of strings, not a single string"),
        ({"texts": ["a cube", 3]}, r"only strings; got a int: 3"),
        ({"texts": CAPTIONS, "vocab_size": 0}, r"`vocab_size` must be a positive integer; got 0"),
        ({"texts": CAPTIONS, "vocab_size": 5}, r"must exceed the 5 special tokens"),
        ({"texts": CAPTIONS, "min_frequency": 0}, r"`min_frequency` must be a positive integer"),
        ({"texts": CAPTIONS, "model_max_length": 2}, r"`model_max_length` must be an integer >= 3"),
    ],
)
def test_train_tokenizer_validates_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train_tokenizer(**kwargs)


# ---------------------------------------------------------------- processor


def test_processor_text_only(processor: XModalProcessor) -> None:
    batch = processor(text=CAPTIONS[:2], return_tensors="pt")
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, batch["input_ids"].shape[1])
    assert processor.batch_decode(batch["input_ids"], skip_special_tokens=True) == CAPTIONS[:2]
    assert processor.decode(batch["input_ids"][0], skip_special_tokens=True) == CAPTIONS[0]


def test_processor_images_only(processor: XModalProcessor) -> None:
    batch = processor(images=[PIL.Image.new("RGB", (30, 40))] * 3, return_tensors="pt")
    assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape == (3, 3, 224, 224)


def test_processor_images_and_text(processor: XModalProcessor) -> None:
    images = [PIL.Image.fromarray(random_rgb(seed=i)) for i in range(2)]
    batch = processor(images=images, text=CAPTIONS[:2], return_tensors="pt")
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "pixel_values"}
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and batch["input_ids"].shape[0] == 2
    expected = XModalImageProcessor()(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], expected)
    # one image scored against several captions is allowed
    single = processor(images=images[0], text=CAPTIONS[:3], return_tensors="pt")
    assert single["pixel_values"].shape[0] == 1 and single["input_ids"].shape[0] == 3
    assert set(processor.model_input_names) == {"input_ids", "token_type_ids", "attention_mask", "pixel_values"}


def test_processor_input_errors(processor: XModalProcessor) -> None:
    with pytest.raises(ValueError, match="at least one input"):
        processor()
    with pytest.raises(TypeError, match=r"images is a str 'cat.png', which is not an image"):
        processor(images="cat.png", text="a cat")


def test_processor_padding_and_truncation(processor: XModalProcessor, tokenizer: BertTokenizer) -> None:
    texts = ["a cube", CAPTIONS[1]]
    longest = processor(text=texts, return_tensors="pt")
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert longest["input_ids"].shape == (2, max(lengths))
    assert longest["attention_mask"].sum(dim=1).tolist() == lengths
    assert (longest["input_ids"][0, lengths[0] :] == tokenizer.pad_token_id).all()

    fixed = processor(text=texts, padding="max_length", max_length=12, return_tensors="pt")
    assert fixed["input_ids"].shape == (2, 12)

    truncated = processor(text=texts, max_length=4, return_tensors="pt")
    assert truncated["input_ids"].shape == (2, 4) and truncated["input_ids"][1, -1] == tokenizer.sep_token_id

    capped = processor(text=" ".join(CAPTIONS), return_tensors="pt")
    assert capped["input_ids"].shape == (1, tokenizer.model_max_length)

    unpadded = processor(text=texts, padding=False, truncation=False)
    assert [len(ids) for ids in unpadded["input_ids"]] == lengths


def test_processor_save_and_load_round_trip(processor: XModalProcessor, tmp_path) -> None:
    processor.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "preprocessor_config.json" not in files  # the image processor is nested in processor_config.json
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "XModalProcessor"
    assert config["image_processor"]["image_processor_type"] == "XModalImageProcessor"

    # `import xmodal` registers XModalImageProcessor with AutoImageProcessor, which XModalProcessor uses to reload it.
    reloaded = XModalProcessor.from_pretrained(tmp_path)
    assert type(reloaded.image_processor) is XModalImageProcessor and type(reloaded.tokenizer) is BertTokenizer
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    images = [PIL.Image.fromarray(random_rgb(seed=i)) for i in range(2)]
    kwargs = {"images": images, "text": ["a red cube", "an unseen zebra"], "return_tensors": "pt"}
    before, after = processor(**kwargs), reloaded(**kwargs)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_a_datasets_column_of_images_is_accepted():
    from xmodal.training.data import make_synthetic_dataset

    test = make_synthetic_dataset(num_train=0, num_validation=0, num_test=3, seed=0, image_size=32)["test"]
    processor = XModalImageProcessor(size={"height": 32, "width": 32})
    from_column = processor(images=test["image"], return_tensors="pt")["pixel_values"]
    from_list = processor(images=list(test["image"]), return_tensors="pt")["pixel_values"]
    assert from_column.shape == (3, 3, 32, 32) and torch.equal(from_column, from_list)
