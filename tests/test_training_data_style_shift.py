"""Style-shift validation (xmodal.training.data.style_shift): the transforms, their composition, the dataset builders
and their errors, on a small synthetic emoji-like drawing, plus one check on the real emoji data."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

import xmodal.training.data.style_shift as style_shift_module
from xmodal.training.data.style_shift import (
    STYLE_SHIFTS,
    compose_style_shift,
    make_style_shift_dataset,
    style_shift,
    style_shift_splits,
)

# Mean absolute difference (8-bit levels over every pixel and channel) a transform must reach on `smiley()`. The
# drawing covers about 31% of the image, so 2 levels overall is about 6.5 levels on average over the drawing: far
# above re-encoding or rounding noise (< 0.5), and below the weakest draws of the mildest transforms (about 2.5 for
# posterize and 3 for hue_shift over seeds 0-9).
MIN_CHANGE = 2.0
DRAWING_RADIUS = 20
FAR = DRAWING_RADIUS + 10  # pixels farther than this from the centre are >= 10 px away from the drawing


def smiley(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (255, 224, 80)) -> Image.Image:
    """A Noto-like face on white: a disc of radius 20 shaded from `colour` at the top to orange at the bottom, dark
    eyes and a dark smile."""
    width, height = size
    centre_x, centre_y = width / 2, height / 2
    ys, xs = np.mgrid[0:height, 0:width]
    t = np.clip((ys - (centre_y - DRAWING_RADIUS)) / (2 * DRAWING_RADIUS), 0, 1)[..., None]
    face = np.rint((1 - t) * np.array(colour) + t * np.array([240, 150, 20]))
    inside = np.hypot(xs + 0.5 - centre_x, ys + 0.5 - centre_y) <= DRAWING_RADIUS
    image = Image.fromarray(np.where(inside[..., None], face, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    dark = (40, 30, 20)
    draw.ellipse((centre_x - 10, centre_y - 9, centre_x - 5, centre_y - 3), fill=dark)
    draw.ellipse((centre_x + 5, centre_y - 9, centre_x + 10, centre_y - 3), fill=dark)
    draw.arc((centre_x - 12, centre_y - 6, centre_x + 12, centre_y + 12), 20, 160, fill=dark, width=3)
    return image


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)).mean())


def non_white_fraction(image: Image.Image) -> float:
    return float((np.asarray(image).min(axis=2) < 231).mean())


STYLES = list(STYLE_SHIFTS)


# --- transforms ----------------------------------------------------------------------------------------------------


def test_registry_has_the_documented_transforms():
    assert 6 <= len(STYLE_SHIFTS) <= 9
    assert all(callable(transform) for transform in STYLE_SHIFTS.values())
    assert set(style_shift_module.__all__) >= {*STYLE_SHIFTS, "STYLE_SHIFTS", "style_shift", "compose_style_shift"}


@pytest.mark.parametrize("name", STYLES)
@pytest.mark.parametrize("size", [(64, 64), (72, 48)])
def test_transform_returns_rgb_of_the_input_size(name, size):
    image = smiley(size)
    for seed in range(3):
        shifted = style_shift(image, name, seed)
        assert shifted.mode == "RGB" and shifted.size == size
    assert np.asarray(image).tobytes() == smiley(size).tobytes()  # the input is not modified


@pytest.mark.parametrize("name", STYLES)
def test_transform_is_deterministic_and_seed_dependent(name):
    image = smiley()
    assert style_shift(image, name, 7).tobytes() == style_shift(image, name, 7).tobytes()
    assert STYLE_SHIFTS[name](image, random.Random(7)).tobytes() == style_shift(image, name, 7).tobytes()
    # every transform draws its parameters; posterize's are partly discrete, so ask for 3 different results of 6
    assert len({style_shift(image, name, seed).tobytes() for seed in range(6)}) >= 3


@pytest.mark.parametrize("name", STYLES)
def test_transform_changes_the_image(name):
    image = smiley()
    for seed in range(5):
        assert mean_difference(style_shift(image, name, seed), image) > MIN_CHANGE, seed


@pytest.mark.parametrize("name", STYLES)
def test_background_far_from_the_drawing_stays_white(name):
    image = smiley()
    ys, xs = np.mgrid[0:64, 0:64]
    far = np.hypot(xs + 0.5 - 32, ys + 0.5 - 32) > FAR
    assert far.sum() > 1000  # the corners
    for seed in range(5):
        assert np.asarray(style_shift(image, name, seed))[far].min() >= 250, seed


@pytest.mark.parametrize("name", STYLES)
def test_blank_image_stays_white(name):
    blank = Image.new("RGB", (64, 64), "white")
    assert np.asarray(style_shift(blank, name, 0)).min() == 255


def test_transparent_input_becomes_white_background():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste(smiley().crop((12, 12, 52, 52)), (12, 12))
    shifted = style_shift(rgba, "blur", 0)
    assert shifted.mode == "RGB" and shifted.getpixel((0, 0)) == (255, 255, 255)


def test_hue_shift_keeps_named_colours_apart():
    """The Noto orange heart (hue 36) and yellow heart (hue 45) are 9 degrees apart: no draw may close the gap."""
    orange = Image.new("RGB", (64, 64), (255, 152, 0))
    for seed in range(20):
        hue = np.asarray(style_shift(orange, "hue_shift", seed).convert("HSV"))[..., 0].mean() * 360 / 256
        assert 26 <= hue < 45, (seed, hue)


# --- composition ---------------------------------------------------------------------------------------------------


def test_compose_applies_distinct_transforms_in_registry_order(monkeypatch):
    calls: list[str] = []

    def recorder(name):
        def transform(image, rng):
            calls.append(name)
            return image

        return transform

    for name in STYLES:
        monkeypatch.setitem(STYLE_SHIFTS, name, recorder(name))
    drawn = set()
    for seed in range(10):
        calls.clear()
        compose_style_shift(smiley(), seed)
        assert len(calls) == len(set(calls)) == 2
        assert calls == sorted(calls, key=STYLES.index)
        drawn.add(tuple(calls))
    assert len(drawn) >= 5  # the seed draws the pair
    calls.clear()
    compose_style_shift(smiley(), 0, num_transforms=3, styles=["blur", "outline", "hue_shift"])
    assert calls == ["hue_shift", "outline", "blur"]


def test_compose_is_deterministic_and_heavy():
    image = smiley()
    assert compose_style_shift(image, 3).tobytes() == compose_style_shift(image, 3).tobytes()
    assert len({compose_style_shift(image, seed).tobytes() for seed in range(5)}) == 5
    assert min(mean_difference(compose_style_shift(image, seed), image) for seed in range(10)) > MIN_CHANGE


# --- datasets ------------------------------------------------------------------------------------------------------

COLOURS = [(255, 224, 80), (120, 200, 255), (255, 120, 160), (150, 230, 120), (200, 160, 255), (255, 190, 120)]


@pytest.fixture
def faces() -> Dataset:
    features = Features({"image": ImageFeature(), "text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    return Dataset.from_dict(
        {
            "image": [smiley(colour=colour) for colour in COLOURS],
            "text": [f"face {index}" for index in range(len(COLOURS))],
            "label": [index % 2 for index in range(len(COLOURS))],
        },
        features=features,
    )


def image_bytes(dataset: Dataset) -> list[bytes]:
    return [image.tobytes() for image in dataset["image"]]


def test_dataset_keeps_rows_and_replaces_images(faces):
    shifted = make_style_shift_dataset(faces, seed=0)
    assert shifted.features == faces.features
    assert shifted["text"] == faces["text"] and shifted["label"] == faces["label"]
    for original, image in zip(faces["image"], shifted["image"]):
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == original.size
        assert mean_difference(image, original) > MIN_CHANGE


def test_dataset_is_deterministic_and_seeded(faces):
    first = image_bytes(make_style_shift_dataset(faces, seed=0))
    assert image_bytes(make_style_shift_dataset(faces, seed=0)) == first
    other = image_bytes(make_style_shift_dataset(faces, seed=1))
    assert sum(a != b for a, b in zip(first, other)) >= len(faces) - 1


def test_dataset_with_one_style_applies_it_to_every_row(faces, monkeypatch):
    calls: list[str] = []
    original_blur = STYLE_SHIFTS["blur"]

    def blur(image, rng):
        calls.append("blur")
        return original_blur(image, rng)

    monkeypatch.setitem(STYLE_SHIFTS, "blur", blur)
    shifted = make_style_shift_dataset(faces, styles=["blur"], num_transforms=1)
    assert calls == ["blur"] * len(faces)
    assert len(set(image_bytes(shifted))) == len(faces)


def test_dataset_is_recomputed_not_read_from_the_datasets_cache(faces, tmp_path, monkeypatch):
    """A file-backed dataset (like an imagefolder) must not give back the images of a previous version of a
    transform: the datasets cache fingerprint does not see the transforms' code."""
    faces.save_to_disk(str(tmp_path / "faces"))
    on_disk = Dataset.load_from_disk(str(tmp_path / "faces"))
    assert on_disk.cache_files
    before = image_bytes(make_style_shift_dataset(on_disk, styles=["blur"], num_transforms=1))
    monkeypatch.setitem(STYLE_SHIFTS, "blur", lambda image, rng: Image.new("RGB", image.size, "white"))
    after = make_style_shift_dataset(on_disk, styles=["blur"], num_transforms=1)
    assert image_bytes(after) != before and np.asarray(after[0]["image"]).min() == 255


def test_dataset_accepts_undecoded_images_and_another_column_name(faces):
    undecoded = faces.rename_column("image", "picture").cast_column("picture", ImageFeature(decode=False))
    shifted = make_style_shift_dataset(undecoded, image_column="picture", seed=0)
    assert shifted.features["picture"] == ImageFeature()
    expected = make_style_shift_dataset(faces, seed=0)
    assert [image.tobytes() for image in shifted["picture"]] == image_bytes(expected)


def test_style_shift_splits(faces):
    splits = style_shift_splits(faces, seed=0)
    assert list(splits) == [*STYLES, "mixed"]
    for dataset in splits.values():
        assert dataset["text"] == faces["text"]
    assert len({tuple(image_bytes(dataset)) for dataset in splits.values()}) == len(splits)


# --- errors --------------------------------------------------------------------------------------------------------


def test_unknown_style_lists_the_accepted_ones(faces):
    with pytest.raises(ValueError, match=r"unknown style 'sketch'.*'blur'"):
        style_shift(smiley(), "sketch", 0)
    with pytest.raises(ValueError, match=r"unknown style 'sketch'.*'low_resolution'"):
        make_style_shift_dataset(faces, styles=["blur", "sketch"])
    with pytest.raises(ValueError, match=r"sequence of style names \(e.g. \['blur'\]\)"):
        compose_style_shift(smiley(), 0, styles="blur")
    with pytest.raises(ValueError, match="distinct"):
        compose_style_shift(smiley(), 0, styles=["blur", "blur"])
    with pytest.raises(ValueError, match="at least one"):
        compose_style_shift(smiley(), 0, styles=[])


@pytest.mark.parametrize(("styles", "num_transforms"), [(None, 0), (None, len(STYLES) + 1), (["blur"], 2)])
def test_num_transforms_out_of_range(faces, styles, num_transforms):
    accepted = len(styles) if styles else len(STYLES)
    with pytest.raises(ValueError, match=rf"num_transforms must be in \[1, {accepted}\].*got {num_transforms}"):
        compose_style_shift(smiley(), 0, num_transforms=num_transforms, styles=styles)
    with pytest.raises(ValueError, match=rf"num_transforms must be in \[1, {accepted}\]"):
        make_style_shift_dataset(faces, styles=styles, num_transforms=num_transforms)


def test_bad_image_column(faces):
    with pytest.raises(ValueError, match=r"image_column 'img' is not a column.*\['image', 'text', 'label'\]"):
        make_style_shift_dataset(faces, image_column="img")
    with pytest.raises(ValueError, match=r"image_column 'text' must be a datasets.Image\(\) feature"):
        make_style_shift_dataset(faces, image_column="text")


def test_bad_types(faces):
    with pytest.raises(TypeError, match=r"datasets.Dataset \(one split of a DatasetDict\), got DatasetDict"):
        make_style_shift_dataset(DatasetDict(train=faces))
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        style_shift(np.zeros((8, 8, 3), np.uint8), "blur", 0)
    with pytest.raises(TypeError, match="seed must be an integer"):
        style_shift(smiley(), "blur", 0.5)


# --- real data -----------------------------------------------------------------------------------------------------


def test_real_emoji_stay_distinguishable_in_every_style(shared_data):
    emoji = load_dataset("imagefolder", data_dir=str(shared_data / "emoji-google"), split="train")
    rows = emoji.select(range(0, len(emoji), len(emoji) // 20)[:20])  # spread over the categories
    originals = rows["image"]
    thumbnails = np.stack([np.asarray(image.convert("L").resize((16, 16)), np.float64).ravel() for image in originals])
    original_fraction = np.mean([non_white_fraction(image) for image in originals])
    for name, dataset in style_shift_splits(rows, seed=0).items():
        assert dataset["text"] == rows["text"] and dataset["codepoint"] == rows["codepoint"]
        images = dataset["image"]
        assert len({image.tobytes() for image in images}) == 20, name
        fractions = [non_white_fraction(image) for image in images]
        assert min(fractions) > 0.05, name  # nothing erased
        # outline's white-filled line art lowers it most (about 0.6x), thick_outline raises it most (about 1.4x)
        assert 0.4 * original_fraction < np.mean(fractions) < 1.6 * original_fraction, (name, np.mean(fractions))
        # a flat emoji can come through posterize almost unchanged, and a grey one through hue_shift
        differences = [mean_difference(a, b) for a, b in zip(images, originals)]
        assert min(differences) > 0 and np.mean(differences) > MIN_CHANGE, (name, differences)
        # each re-rendering is still nearest (pixel distance of 16 px grey thumbnails) to its own original far more
        # often than chance (1 in 20); pixel distance is a crude proxy, line art being farthest from the fills
        shifted = np.stack([np.asarray(image.convert("L").resize((16, 16)), np.float64).ravel() for image in images])
        distances = np.abs(shifted[:, None] - thumbnails[None]).mean(axis=2)
        assert (distances.argmin(axis=1) == np.arange(20)).sum() >= 5, name
