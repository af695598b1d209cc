"""Bad input, tried systematically, against the processor: image sizes, PIL modes, damaged files, decompression
bombs, arrays of every rank/dtype/layout, non-finite pixels, hostile texts and mismatched batches.

Each input gets a correct result or a `ValueError`/`TypeError` that names it (`images[3]`, `text[1]`); nothing may
crash inside PIL, numpy or torch, and no output may have a silently wrong shape.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BertTokenizer

from xmodal.processing import XModalImageProcessor, XModalProcessor, train_tokenizer

CAPTIONS = ["a red cube on a table", "two blue spheres", "a small yellow cylinder", "the green cone"]
MAX_LENGTH = 16
# Every PIL mode an image file or `Image.new` can produce, with how each is built from an RGB image.
ALL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"]
SIXTEEN_BIT_MODES = ["I;16", "I;16L", "I;16B", "I;16N"]
FILE_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
LAZY_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF"]  # PIL.Image.open reads only the header (WebP decodes at once)


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return train_tokenizer(CAPTIONS * 4, vocab_size=120, model_max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def processor(tokenizer: BertTokenizer) -> XModalProcessor:
    return XModalProcessor(image_processor=XModalImageProcessor(), tokenizer=tokenizer)


def pixels(images: object, **kwargs: object) -> torch.Tensor:
    """The processor's `pixel_values` (float32, `(N, 3, 224, 224)`)."""
    return XModalImageProcessor()(images, return_tensors="pt", **kwargs)["pixel_values"]


def raw(images: object, **kwargs: object) -> np.ndarray:
    """The `(N, 3, H, W)` uint8 RGB pixels the processor derives, before resizing and normalisation."""
    processor = XModalImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    return processor(images, return_tensors="np", **kwargs)["pixel_values"].astype(np.uint8)


def in_mode(mode: str, size: tuple[int, int], colour: tuple[int, int, int] = (204, 102, 51)) -> PIL.Image.Image:
    """A solid image of `colour` (a web-palette colour, so `P` needs no dithering) in any PIL mode; premultiplied
    and 16-bit modes are built the way PIL allows (transparent black, and 25700 = 100 * 257)."""
    if mode in ("La", "RGBa", "PA"):
        return PIL.Image.new(mode, size)
    if mode in SIXTEEN_BIT_MODES:
        return PIL.Image.new(mode, size, 25700)
    return PIL.Image.new("RGB", size, colour).convert(mode, dither=PIL.Image.Dither.NONE)


def encoded(image: PIL.Image.Image, file_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------- sizes and modes


@settings(max_examples=12, deadline=None)
@given(
    height=st.one_of(st.integers(1, 40), st.integers(41, 4096)),
    width=st.one_of(st.integers(1, 40), st.integers(41, 4096)),
    mode=st.sampled_from(ALL_MODES + SIXTEEN_BIT_MODES),
)
def test_a_solid_image_of_any_size_and_mode_gives_its_colour_at_the_fixed_shape(height: int, width: int, mode: str):
    # size invariance: a solid image gives the same pixel values as its 1x1 version, whatever its size and mode
    values = pixels(in_mode(mode, (width, height)))
    assert values.shape == (1, 3, 224, 224) and values.dtype == torch.float32
    reference = pixels(in_mode(mode, (1, 1)))
    torch.testing.assert_close(values, reference, atol=0.02, rtol=0)


@pytest.mark.parametrize("size", [(4096, 4096), (1, 4096), (4096, 1), (1, 1), (3, 4096)])
def test_extreme_sizes(size: tuple[int, int]) -> None:
    width, height = size
    image = PIL.Image.fromarray(noise(height, width))
    values = pixels([image, np.asarray(image)])
    assert values.shape == (2, 3, 224, 224) and torch.isfinite(values).all()
    torch.testing.assert_close(values[0], values[1])  # PIL and numpy inputs agree


@pytest.mark.parametrize("mode", ALL_MODES + SIXTEEN_BIT_MODES)
def test_every_pil_mode_gives_the_expected_rgb(mode: str) -> None:
    image = in_mode(mode, (3, 2))
    if mode in ("La", "RGBa", "PA"):
        expected = (255, 255, 255)  # transparent black (alpha 0) composited on white
    elif mode in SIXTEEN_BIT_MODES:
        expected = (100, 100, 100)  # 25700 / 257: 16-bit data is scaled, not clipped
    elif mode in ("I", "F"):
        expected = (image.getpixel((0, 0)),) * 3  # 8-bit grey values stored as integers / floats are kept
    else:
        expected = image.convert("RGB").getpixel((0, 0))  # PIL's own conversion is the reference
    values = raw(image)
    assert values.shape == (1, 3, 2, 3)
    np.testing.assert_allclose(values[0, :, 0, 0], expected, atol=1)


def test_a_batch_mixing_every_mode_keeps_each_image_in_place() -> None:
    modes = ALL_MODES + SIXTEEN_BIT_MODES
    colours = [(51 * (index % 6), 102, 255 - 51 * (index % 5)) for index in range(len(modes))]
    images = [in_mode(mode, (5, 7), colour) for mode, colour in zip(modes, colours)]
    batch = raw(images)
    assert batch.shape == (len(modes), 3, 7, 5)
    for index, image in enumerate(images):
        np.testing.assert_array_equal(batch[index], raw(image)[0])


# ---------------------------------------------------------------- files: truncated, corrupted, zero bytes


@pytest.mark.parametrize("file_format", LAZY_FORMATS)
def test_truncated_file_names_the_image_and_the_file(tmp_path: Path, file_format: str) -> None:
    data = encoded(PIL.Image.fromarray(noise(64, 64)), file_format)
    path = tmp_path / f"cut.{file_format.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    good = PIL.Image.fromarray(noise(8, 8))
    damaged = PIL.Image.open(path)  # lazy: reads the header only, which survived the cut
    with pytest.raises(ValueError, match=rf"images\[1\] \(file '.*cut\.{file_format.lower()}'\) could not be decoded"):
        pixels([good, damaged])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    file_format=st.sampled_from(FILE_FORMATS),
    damage=st.sampled_from(["truncate", "overwrite", "flip"]),
    position=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_damaged_files_give_an_image_or_a_named_value_error(
    file_format: str, damage: str, position: float, seed: int
) -> None:
    data = bytearray(encoded(PIL.Image.fromarray(noise(24, 20, seed)), file_format))
    offset = int(position * (len(data) - 1))
    if damage == "truncate":
        data = data[:offset]
    elif damage == "overwrite":
        data[offset : offset + 16] = np.random.default_rng(seed).integers(0, 256, 16, dtype=np.uint8).tobytes()
    else:
        data[offset] ^= 0xFF
    try:
        image = PIL.Image.open(io.BytesIO(bytes(data)))
    except Exception:  # an unreadable header is PIL.Image.open's to report, before any processor sees the image
        return
    try:
        values = pixels([PIL.Image.new("RGB", (4, 4)), image])
    except ValueError as err:
        assert str(err).startswith("images[1]"), err
        return
    assert values.shape == (2, 3, 224, 224) and torch.isfinite(values).all()


def test_zero_byte_and_garbage_files_fail_in_pil_open_and_are_not_loaded_by_the_processor(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(PIL.UnidentifiedImageError, match="empty.png"):
        PIL.Image.open(empty)
    # the processor never reads files itself: paths, bytes and file objects are refused with a hint
    for bad in (str(empty), empty, b"", io.BytesIO(b"\x89PNG")):
        with pytest.raises(TypeError, match=r"images\[0\] is a .*not an image.*open the image first"):
            pixels([bad])


# ---------------------------------------------------------------- decompression bombs


def test_decompression_bomb_limit_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    PIL.Image.new("RGB", (40, 40)).save(path)  # 1600 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"images\[1\] has 40x40 = 1600 pixels, more than PIL.Image.MAX_IMAGE_PIXELS"):
        pixels([PIL.Image.new("RGB", (10, 10)), PIL.Image.new("RGB", (40, 40))])
    # between the limit and twice the limit PIL.Image.open only warns; the processor refuses before decoding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        lazy = PIL.Image.open(path)
    with pytest.raises(ValueError, match=r"images \(file '.*bomb.png'\) has 40x40 = 1600 pixels.*= 1000"):
        pixels(lazy)
    # above twice the limit PIL.Image.open itself refuses the file
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 700)
    with pytest.raises(PIL.Image.DecompressionBombError):
        PIL.Image.open(path)
    # no limit: processed
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
    assert pixels(PIL.Image.open(path)).shape == (1, 3, 224, 224)


# ---------------------------------------------------------------- numpy arrays and tensors


def _as_dtype(hwc: np.ndarray, dtype: str) -> np.ndarray:
    """`hwc` (uint8) encoded in `dtype` the way the processor documents it (same image)."""
    if dtype == "uint16":
        return hwc.astype(np.uint16) * 257
    if dtype in ("float16", "float32", "float64"):
        return (hwc / 255.0).astype(dtype)
    if dtype == "int64":
        return hwc.astype(np.int64)
    if dtype == "bool":
        return hwc >= 128
    return hwc


@settings(max_examples=30, deadline=None)
@given(
    height=st.integers(5, 40),
    width=st.integers(5, 40),
    channels=st.sampled_from([1, 3, 4, None]),
    channels_first=st.booleans(),
    dtype=st.sampled_from(["uint8", "uint16", "int64", "float16", "float32", "float64", "bool"]),
    as_tensor=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_arrays_of_any_layout_and_dtype_give_the_same_pixels(
    height: int, width: int, channels: int | None, channels_first: bool, dtype: str, as_tensor: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (height, width, channels or 1), dtype=np.uint8)
    if channels == 4:
        hwc[..., 3] = 255  # opaque: compositing on white changes nothing
    if dtype == "bool":
        hwc = np.where(hwc >= 128, 255, 0).astype(np.uint8)
        if channels == 4:
            hwc[..., 3] = 255
    expected = np.repeat(hwc, 3, axis=-1) if hwc.shape[-1] == 1 else hwc[..., :3]
    array = _as_dtype(hwc if channels is not None else hwc[..., 0], dtype)
    if channels is not None and channels_first:
        array = np.moveaxis(array, -1, 0)
    image = torch.from_numpy(np.ascontiguousarray(array)) if as_tensor and dtype != "uint16" else array
    atol = 1 if dtype == "float16" else 0  # float16 cannot hold every k/255 exactly
    np.testing.assert_allclose(raw(image)[0], expected.transpose(2, 0, 1), atol=atol)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (np.zeros(7, np.uint8), ValueError, r"images\[1\] is a ndarray of shape \(7,\).*no image layout"),
        (np.zeros((1, 2, 8, 8, 3), np.uint8), ValueError, r"images\[1\] is a ndarray of shape \(1, 2, 8, 8, 3\)"),
        (np.zeros((8, 8, 2), np.uint8), ValueError, r"images\[1\]: Cannot find the channel dimension.*\(8, 8, 2\)"),
        (np.zeros((8, 8, 7), np.uint8), ValueError, r"images\[1\]: Cannot find the channel dimension"),
        (np.zeros((2, 8, 8), np.uint8), ValueError, r"images\[1\]: Cannot find the channel dimension"),
        (np.zeros((8, 8, 3), np.complex64), TypeError, r"images\[1\]: Unsupported pixel dtype complex64"),
        (np.full((8, 8, 3), "x"), TypeError, r"images\[1\]: Unsupported pixel dtype <U1"),
        (np.empty((8, 8, 3), object), TypeError, r"images\[1\]: Unsupported pixel dtype object"),
        (np.full((8, 8, 3), -3, np.int16), ValueError, r"images\[1\]: Integer images must not hold negative values"),
        (np.full((8, 8, 3), 2.0, np.float32) * 200, ValueError, r"images\[1\]: Float images must hold values in"),
        (np.full((8, 8, 3), -0.5), ValueError, r"images\[1\]: Float images must hold values in \[0, 1\]"),
        (np.zeros((8, 0, 3), np.uint8), ValueError, r"images\[1\] is a zero-sized image"),
        (torch.zeros(3, 8, 8, dtype=torch.complex64), TypeError, r"images\[1\]: Unsupported pixel dtype complex64"),
    ],
    ids=lambda value: None,
)
def test_bad_arrays_are_named(bad: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        pixels([np.zeros((8, 8, 3), np.uint8), bad])


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    bad_index=st.integers(0, 3),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    where=st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(0, 2)),
    as_tensor=st.booleans(),
)
def test_non_finite_pixels_name_the_image(
    batch: int, bad_index: int, value: float, dtype: type, where: tuple[int, int, int], as_tensor: bool
) -> None:
    bad_index %= batch
    images = [np.full((8, 8, 3), 0.5, dtype) for _ in range(batch)]
    images[bad_index][where] = value
    if as_tensor:
        images = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
    with pytest.raises(ValueError, match=rf"^images\[{bad_index}\]: The image contains NaN or infinite values"):
        pixels(images)


def test_a_4d_batch_names_the_bad_image_by_its_position() -> None:
    batch = np.full((3, 8, 8, 3), 0.5, np.float32)
    batch[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^images\[2\]: The image contains NaN"):
        pixels(batch)
    with pytest.raises(ValueError, match=r"^images\[1\]\[2\]: The image contains NaN"):
        pixels([np.zeros((8, 8, 3), np.uint8), batch])


# ---------------------------------------------------------------- texts


def _check_encoding(batch: dict, tokenizer: BertTokenizer, count: int) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == count and ids.shape == mask.shape and ids.shape[1] <= MAX_LENGTH
    lengths = mask.sum(dim=1)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert (ids[torch.arange(count), lengths - 1] == tokenizer.sep_token_id).all()
    assert ((ids < len(tokenizer)) & (ids >= 0)).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=200), min_size=1, max_size=5))
def test_any_unicode_text_gives_a_well_formed_encoding(
    processor: XModalProcessor, tokenizer: BertTokenizer, texts: list[str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the truncation warning has its own test
        batch = processor(text=texts, return_tensors="pt")
    _check_encoding(batch, tokenizer, len(texts))


@pytest.mark.parametrize(
    "text",
    [
        "",
        " \t\n\u00a0\u3000",
        "🐱🐶 a red cube 👍🏽👨‍👩‍👧",
        "红色的立方体在桌子上",
        "مكعب أحمر على الطاولة",
        "שלום עולם",
        "cube\u0301\u0302\u0303 e\u0301",
        "red\x00cube\x00",
        "\x00",
        "\u200b\u200d\ufeff",
    ],
    ids=["empty", "whitespace", "emoji", "cjk", "arabic", "hebrew", "combining", "nul", "only-nul", "zero-width"],
)
def test_special_texts(processor: XModalProcessor, tokenizer: BertTokenizer, text: str) -> None:
    batch = processor(text=[text, "a red cube"], return_tensors="pt")
    _check_encoding(batch, tokenizer, 2)
    if not text.strip("\x00\u200b\u200d\ufeff \t\n\u00a0\u3000"):
        # nothing left after normalisation: [CLS] [SEP]
        assert batch["attention_mask"][0].sum() == 2


def test_nul_and_combining_marks_are_dropped_by_the_normalizer(processor: XModalProcessor) -> None:
    plain = processor(text="red cube", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(processor(text="red\x00 cube", return_tensors="pt")["input_ids"], plain)
    torch.testing.assert_close(processor(text="re\u0301d cube", return_tensors="pt")["input_ids"], plain)


def test_long_texts_are_truncated_with_the_limit_named(processor: XModalProcessor, tokenizer: BertTokenizer) -> None:
    long_text = "a red cube " * 500
    with pytest.warns(UserWarning, match=f"longer than {MAX_LENGTH} tokens .* truncated to {MAX_LENGTH} tokens"):
        batch = processor(text=["a cube", long_text], return_tensors="pt")
    assert batch["input_ids"].shape == (2, MAX_LENGTH)
    assert batch["input_ids"][1, -1] == tokenizer.sep_token_id
    with pytest.warns(UserWarning, match="longer than 7 tokens .* truncated to 7 tokens"):
        assert processor(text=long_text, max_length=7, return_tensors="pt")["input_ids"].shape == (1, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short texts and explicit truncation=False warn nothing of ours
        processor(text=["a cube", "a red cube on a table"], return_tensors="pt")
        untruncated = processor(text=long_text, truncation=False, return_tensors="pt")
    assert untruncated["input_ids"].shape[1] > MAX_LENGTH


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ([], ValueError, "empty list of texts"),
        ((), ValueError, "empty list of texts"),
        (["a", None], TypeError, r"text\[1\] is a NoneType None; expected a string"),
        (["a", b"bytes"], TypeError, r"text\[1\] is a bytes"),
        (["a", ["nested"]], TypeError, r"text\[1\] is a list"),
        (5, TypeError, r"text is a int 5"),
        (
            ["ok", "bad \ud800 surrogate"],
            ValueError,
            r"text\[1\] is not valid Unicode: surrogates not allowed at position 4",
        ),
    ],
    ids=lambda value: None,
)
def test_bad_texts_are_named(processor: XModalProcessor, text: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        processor(text=text)


@pytest.mark.parametrize("max_length", [0, 1, 2, -5, 2.5, True, "16"])
def test_max_length_that_cannot_hold_a_token_is_refused(processor: XModalProcessor, max_length: object) -> None:
    with pytest.raises(ValueError, match=r"max_length must be an integer >= 3"):
        processor(text="a red cube", max_length=max_length)


# ---------------------------------------------------------------- images and texts together


@pytest.mark.parametrize(
    ("images", "text", "num_images", "num_texts"),
    [
        (lambda image: [image, image], ["a", "b", "c"], 2, 3),  # N x K: the zero-shot call
        (lambda image: image, ["a", "b", "c"], 1, 3),  # 1 x K
        (lambda image: (image,), ["a", "b"], 1, 2),
        (lambda image: [image, image, image], "a", 3, 1),  # N x 1
        (lambda image: [image, image], ["a"], 2, 1),
        (lambda image: np.zeros((2, 8, 8, 3), np.uint8), ["a", "b", "c"], 2, 3),
        (lambda image: [np.zeros((2, 8, 8, 3), np.uint8), image], ["a", "b"], 3, 2),
        (lambda image: torch.zeros(4, 3, 8, 8), ("a", "b"), 4, 2),
    ],
)
def test_any_number_of_images_goes_with_any_number_of_texts(
    processor: XModalProcessor, images: object, text: object, num_images: int, num_texts: int
) -> None:
    """CLIPProcessor semantics: the processor never pairs images with texts, so the counts are free."""
    batch = processor(images=images(PIL.Image.fromarray(noise(8, 8))), text=text, return_tensors="pt")
    assert batch["pixel_values"].shape[0] == num_images
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == num_texts


def test_image_errors_through_the_processor_name_the_flat_image_index(processor: XModalProcessor) -> None:
    bad = np.full((8, 8, 3), np.inf, np.float32)
    with pytest.raises(ValueError, match=r"^images\[2\]: The image contains NaN or infinite values"):
        processor(images=[np.zeros((2, 8, 8, 3), np.uint8), bad], text=["a", "b", "c"])
