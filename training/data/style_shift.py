"""Style-shift validation: drawings on white re-rendered so that they look like another artist's style.

The real held-out evaluation of an emoji model is the same emoji drawn by other vendors (Apple, Twitter, Facebook,
OpenMoji, ...), which must stay unseen. To choose a training recipe without it, validation retrieval runs on the
training style's own images, re-rendered by transforms that are different in kind from the training augmentations
(random resized crop, horizontal flip, brightness / contrast / saturation jitter, greyscale):

* ``shape_warp``: other proportions: anisotropic scale, shear and a fisheye that enlarges the middle of the drawing.
* ``hue_shift``: another palette: a small hue rotation and a saturation change.
* ``flat_colour``: flat shading: median filter, a few flat colours, thin region borders and a dark outline.
* ``outline``: line art: dark lines on the colour edges, filled with white or with the drawing's main colour.
* ``thick_outline``: a dark stroke around the silhouette.
* ``posterize``: 2-3 bits per channel, or a palette of 4-8 colours.
* ``blur``: a Gaussian blur.
* ``low_resolution``: pixel art: downsampled to 12-24 px and back up.

Every transform is a function ``(image, rng) -> image`` of an RGB :class:`PIL.Image.Image` and a
:class:`random.Random` that draws its parameters; the output is RGB of the input's size. Pixel distances are given
for 64 px images (the emoji size) and scale with the image's shorter side. The transforms assume a drawing on a white
background: a pixel belongs to the drawing when its darkest channel is below ``255 - 24``, and the background away
from the drawing stays white.

:func:`make_style_shift_dataset` re-renders every image of a :class:`datasets.Dataset` (by default with two different
transforms per image, a "heavy re-rendering"); row ``i`` draws from its own random stream seeded with ``(seed, i)``,
so the result is byte-identical across calls and processes; it is kept in memory and never read from the datasets
cache. :func:`style_shift_splits` gives one dataset per style plus a ``"mixed"`` one, for reporting retrieval per
style.
"""

from __future__ import annotations

import hashlib
import numbers
import random
from collections.abc import Callable, Sequence

import numpy as np
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image, ImageFilter

StyleTransform = Callable[[Image.Image, random.Random], Image.Image]
"""A style transform: ``(RGB image, random stream) -> RGB image of the same size``."""

_REFERENCE_SIZE = 64  # pixel distances below are for this image side and scale with the image's shorter side
_INK = 24  # a pixel belongs to the drawing when its darkest channel is below 255 - _INK
_WHITE = 255
_REGION_STEP = 60  # flat_colour draws a border between flat colours that differ by more than this in a channel


# --------------------------------------------------------------------------------------------------------- helpers
def _pixels(image: Image.Image, length: float) -> float:
    """``length`` pixels of a 64 px image, scaled to ``image``'s shorter side."""
    return length * min(image.size) / _REFERENCE_SIZE


def _radius(image: Image.Image, length: float) -> int:
    """:func:`_pixels` rounded to an integer >= 1 (a filter radius)."""
    return max(1, round(_pixels(image, length)))


def _drawing(array: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(H, W)`` bool, True on the drawing (the pixels that are not near-white)."""
    return array.min(axis=2) < _WHITE - _INK


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``(H, W)`` bool -> ``(H, W)`` bool grown by ``radius`` pixels (a disc of that radius)."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    grown = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * (radius + 1):
                grown |= padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
    return grown


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """``(H, W)`` bool -> ``(H, W)`` bool shrunk by ``radius`` pixels; the image border counts as background."""
    return ~_dilate(~np.pad(mask, radius), radius)[radius:-radius, radius:-radius]


def _dark_colour(rng: random.Random) -> np.ndarray:
    """``(3,)`` uint8: a near-black line colour, grey or slightly warm."""
    level = rng.randint(10, 60)
    return np.array([level, round(level * rng.uniform(0.8, 1.0)), round(level * rng.uniform(0.6, 1.0))], np.uint8)


def _quantize(image: Image.Image, colours: int) -> np.ndarray:
    """``image`` with at most ``colours`` colours (median cut) as ``(H, W, 3)`` uint8; near-white becomes white."""
    array = np.array(image.quantize(colours, method=Image.Quantize.MEDIANCUT).convert("RGB"))
    array[~_drawing(array)] = _WHITE
    return array


def _dark_edges(image: Image.Image) -> np.ndarray:
    """``(H, W)`` int: how much darker a pixel is than its 8 neighbours (a 3x3 Laplacian, the largest over the
    channels): about 3x the step on the dark side of an edge, 0 on its light side, so the lines are 1 px wide."""
    inverted = Image.eval(image, lambda value: _WHITE - value)
    return np.asarray(inverted.filter(ImageFilter.FIND_EDGES)).max(axis=2).astype(np.int64)


def _sample_bilinear(array: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sample ``(H, W, 3)`` uint8 at float pixel coordinates ``xs``, ``ys`` of shape ``(H', W')``; white outside."""
    height, width = array.shape[:2]
    padded = np.pad(array.astype(np.float32), ((1, 1), (1, 1), (0, 0)), constant_values=_WHITE)
    xs = np.clip(xs + 1, 0, width + 1)
    ys = np.clip(ys + 1, 0, height + 1)
    x0 = np.minimum(np.floor(xs).astype(np.int64), width)
    y0 = np.minimum(np.floor(ys).astype(np.int64), height)
    fx = (xs - x0)[..., None]
    fy = (ys - y0)[..., None]
    top = padded[y0, x0] * (1 - fx) + padded[y0, x0 + 1] * fx
    bottom = padded[y0 + 1, x0] * (1 - fx) + padded[y0 + 1, x0 + 1] * fx
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, _WHITE).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------ transforms
def shape_warp(image: Image.Image, rng: random.Random) -> Image.Image:
    """Other proportions: about the centre of the drawing's bounding box, scale x and y by 0.85-1.0 each, shear x
    by -0.12 to 0.12 per pixel of y, and a fisheye that enlarges the middle by 1.0-1.25 while the bounding box's
    half side keeps its radius. White fills what comes from outside the image; a blank image is returned as is."""
    array = np.asarray(image)
    rows, cols = np.nonzero(_drawing(array))
    if rows.size == 0:
        return image.copy()
    centre_x, centre_y = (cols.min() + cols.max()) / 2, (rows.min() + rows.max()) / 2
    radius = max(cols.max() - cols.min(), rows.max() - rows.min(), 1) / 2
    forward = np.array([[rng.uniform(0.85, 1.0), rng.uniform(-0.12, 0.12)], [0.0, rng.uniform(0.85, 1.0)]])
    fisheye = rng.uniform(0.0, 0.25)
    ys, xs = np.mgrid[0 : array.shape[0], 0 : array.shape[1]].astype(np.float64)
    # each output pixel reads the input at inverse(forward) of its offset, pushed out radially by the fisheye
    offsets = np.linalg.inv(forward) @ np.stack([xs.ravel() - centre_x, ys.ravel() - centre_y])
    stretch = (1 + fisheye * (offsets**2).sum(axis=0) / radius**2) / (1 + fisheye)
    source_x = (centre_x + offsets[0] * stretch).reshape(xs.shape)
    source_y = (centre_y + offsets[1] * stretch).reshape(ys.shape)
    return Image.fromarray(_sample_bilinear(array, source_x, source_y))


def hue_shift(image: Image.Image, rng: random.Random) -> Image.Image:
    """Another palette: rotate the hue by 3-8 degrees either way and scale the saturation by 0.8-0.9 or 1.1-1.3.

    Both are kept small because emoji differ by colour: in the Noto palette the orange heart (hue 36) and the yellow
    heart (hue 45) are 9 degrees apart, and a paler red heart reads as the pink one. White and greys have no
    saturation and stay as they are."""
    hsv = np.asarray(image.convert("HSV")).astype(np.float64)
    hsv[..., 0] = (hsv[..., 0] + rng.choice((-1, 1)) * rng.uniform(3, 8) * 256 / 360) % 256
    hsv[..., 1] *= rng.uniform(0.8, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.3)
    shifted = Image.fromarray(np.clip(np.rint(hsv), 0, 255).astype(np.uint8), "HSV")
    return shifted.convert("RGB")


def flat_colour(image: Image.Image, rng: random.Random) -> Image.Image:
    """Flat cartoon shading: a 3 or 5 px median filter, 4-7 flat colours (white included), 1 px dark borders between
    colour regions that differ by more than 60 levels in a channel (not between the bands of a soft gradient) and a
    dark outline 2-3 px wide over the drawing's silhouette."""
    smooth = image.filter(ImageFilter.MedianFilter(2 * _radius(image, rng.choice((1, 2))) + 1))
    array = _quantize(smooth, rng.randint(4, 7))
    drawing = _drawing(array)
    levels = array.astype(np.int64)
    borders = np.zeros_like(drawing)
    borders[:, 1:] |= np.abs(levels[:, 1:] - levels[:, :-1]).max(axis=2) > _REGION_STEP
    borders[1:] |= np.abs(levels[1:] - levels[:-1]).max(axis=2) > _REGION_STEP
    silhouette = _dilate(drawing, 1) & ~_erode(drawing, _radius(image, rng.uniform(1, 2)))
    array[(borders & drawing) | silhouette] = _dark_colour(rng)
    return Image.fromarray(array)


def outline(image: Image.Image, rng: random.Random) -> Image.Image:
    """Line art: 1 px dark lines on the dark side of every step of more than 20-40 levels in a channel and a 1-2 px
    line along the inside of the silhouette, filled with white (half of the draws) or with the drawing's main colour
    (the commonest of 8 median-cut colours; a mean would turn a red heart with highlights pink) lightened by 0-15%."""
    array = np.asarray(image)
    drawing = _drawing(array)
    lines = (_dark_edges(image) > rng.uniform(60, 120)) & drawing
    lines |= drawing & ~_erode(drawing, _radius(image, rng.choice((1, 2))))
    result = np.full_like(array, _WHITE)
    if rng.random() < 0.5 and drawing.any():
        colours, counts = np.unique(_quantize(image, 8)[drawing].reshape(-1, 3), axis=0, return_counts=True)
        main = colours[counts.argmax()].astype(np.float64)
        result[drawing] = np.rint(main + rng.uniform(0.0, 0.15) * (_WHITE - main)).astype(np.uint8)
    result[lines] = _dark_colour(rng)
    return Image.fromarray(result)


def thick_outline(image: Image.Image, rng: random.Random) -> Image.Image:
    """A dark stroke 2-4 px wide just outside the drawing's silhouette, near-black or the drawing's mean colour
    darkened to 20-40%."""
    array = np.array(image)
    drawing = _drawing(array)
    if not drawing.any():
        return image.copy()
    ring = _dilate(drawing, _radius(image, rng.uniform(2, 4))) & ~drawing
    if rng.random() < 0.5:
        colour = _dark_colour(rng)
    else:
        colour = np.rint(array[drawing].mean(axis=0) * rng.uniform(0.2, 0.4)).astype(np.uint8)
    array[ring] = colour
    return Image.fromarray(array)


def posterize(image: Image.Image, rng: random.Random) -> Image.Image:
    """Half of the draws: 2 or 3 bits per channel (levels spread evenly from 0 to 255, so white stays white); the
    other half: a palette of 4-8 colours (median cut, white included)."""
    if rng.random() < 0.5:
        levels = 2 ** rng.choice((2, 3)) - 1
        array = np.rint(np.rint(np.asarray(image) / _WHITE * levels) * _WHITE / levels).astype(np.uint8)
    else:
        array = _quantize(image, rng.randint(4, 8))
    return Image.fromarray(array)


def blur(image: Image.Image, rng: random.Random) -> Image.Image:
    """A Gaussian blur of radius 1-2.5 px."""
    return image.filter(ImageFilter.GaussianBlur(_pixels(image, rng.uniform(1.0, 2.5))))


def low_resolution(image: Image.Image, rng: random.Random) -> Image.Image:
    """Pixel art: box-downsample the shorter side to 12-24 px (aspect kept) and upsample back, nearest or bilinear."""
    factor = rng.uniform(12, 24) / _REFERENCE_SIZE
    small = tuple(max(1, round(side * factor)) for side in image.size)
    resample = rng.choice((Image.Resampling.NEAREST, Image.Resampling.BILINEAR))
    return image.resize(small, Image.Resampling.BOX).resize(image.size, resample)


STYLE_SHIFTS: dict[str, StyleTransform] = {
    "shape_warp": shape_warp,
    "hue_shift": hue_shift,
    "flat_colour": flat_colour,
    "outline": outline,
    "thick_outline": thick_outline,
    "posterize": posterize,
    "blur": blur,
    "low_resolution": low_resolution,
}
"""The style transforms by name, in the order :func:`compose_style_shift` applies them (geometry, palette, drawing
style, then degradations)."""


# ------------------------------------------------------------------------------------------------------------- api
def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def _check_styles(styles: Sequence[str] | None) -> list[str]:
    """The accepted style names, in :data:`STYLE_SHIFTS` order (all of them for None)."""
    if styles is None:
        return list(STYLE_SHIFTS)
    if isinstance(styles, str):
        raise ValueError(f"styles must be a sequence of style names (e.g. [{styles!r}]), got the string {styles!r}")
    names = list(styles)
    unknown = [name for name in names if name not in STYLE_SHIFTS]
    if unknown:
        raise ValueError(f"unknown style {unknown[0]!r}: accepted styles are {list(STYLE_SHIFTS)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"styles must be distinct style names, at least one, got {names}")
    return [name for name in STYLE_SHIFTS if name in names]


def _check_num_transforms(num_transforms: object, names: list[str]) -> None:
    if isinstance(num_transforms, bool) or not isinstance(num_transforms, numbers.Integral):
        raise TypeError(f"num_transforms must be an integer, got {num_transforms!r}")
    if not 1 <= num_transforms <= len(names):
        raise ValueError(
            f"num_transforms must be in [1, {len(names)}] (the number of styles {names}), got {num_transforms}"
        )


def _as_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB; transparent pixels become white (emoji sit on white)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def style_shift(image: Image.Image, name: str, seed: int) -> Image.Image:
    """Re-render ``image`` with the style transform ``name`` of :data:`STYLE_SHIFTS`, its parameters drawn from
    ``random.Random(seed)``.

    Args:
        image: a drawing on white, any PIL mode (converted to RGB; transparency becomes white).
        name: a key of :data:`STYLE_SHIFTS`.
        seed: integer seed; the same image, name and seed always give the same pixels.

    Returns:
        An RGB :class:`PIL.Image.Image` of ``image``'s size.

    Raises:
        ValueError: ``name`` is not a style (the message lists the accepted ones).
        TypeError: ``image`` is not a PIL image or ``seed`` not an integer.
    """
    if name not in STYLE_SHIFTS:
        raise ValueError(f"unknown style {name!r}: accepted styles are {list(STYLE_SHIFTS)}")
    return STYLE_SHIFTS[name](_as_rgb(image), random.Random(_check_seed(seed)))


def compose_style_shift(
    image: Image.Image, seed: int, num_transforms: int = 2, styles: Sequence[str] | None = None
) -> Image.Image:
    """A heavy re-rendering: ``num_transforms`` different style transforms drawn by ``seed``, applied in
    :data:`STYLE_SHIFTS` order.

    Args:
        image: a drawing on white, any PIL mode (converted to RGB; transparency becomes white).
        seed: integer seed of the one random stream that draws the transforms and then their parameters.
        num_transforms: how many different transforms, in ``[1, len(styles)]``.
        styles: the style names to draw from; None for all of :data:`STYLE_SHIFTS`.

    Returns:
        An RGB :class:`PIL.Image.Image` of ``image``'s size.

    Raises:
        ValueError: an unknown, repeated or empty ``styles``, or ``num_transforms`` out of range.
        TypeError: ``image`` is not a PIL image or ``seed`` / ``num_transforms`` not an integer.
    """
    names = _check_styles(styles)
    _check_num_transforms(num_transforms, names)
    rng = random.Random(_check_seed(seed))
    chosen = set(rng.sample(names, num_transforms))
    image = _as_rgb(image)
    for name in names:
        if name in chosen:
            image = STYLE_SHIFTS[name](image, rng)
    return image


def _row_seed(seed: int, index: int) -> int:
    """A 63-bit seed for row ``index``: SHA-256 of ``"{seed}-{index}"`` (the same in every process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}-{index}".encode()).digest()[:8], "big") >> 1


def make_style_shift_dataset(
    dataset: Dataset,
    image_column: str = "image",
    seed: int = 0,
    styles: Sequence[str] | None = None,
    num_transforms: int = 2,
) -> Dataset:
    """The rows of ``dataset`` with each image re-rendered by :func:`compose_style_shift`.

    Args:
        dataset: a :class:`datasets.Dataset` whose ``image_column`` is a :class:`datasets.Image` feature (decoded
            or not); every other column is kept as it is, in the same row order.
        image_column: name of the image column.
        seed: integer seed; row ``i`` is seeded with the SHA-256 of ``f"{seed}-{i}"``, so the result is
            byte-identical across calls and processes.
        styles: the style names to draw from; None for all of :data:`STYLE_SHIFTS`. One name with
            ``num_transforms=1`` applies that style to every row.
        num_transforms: how many different transforms per image, in ``[1, len(styles)]``.

    Returns:
        An in-memory :class:`datasets.Dataset` (recomputed on every call, never read from the datasets cache) with
        the same features except that ``image_column`` is a decoded ``datasets.Image()`` of RGB images (stored as
        PNG) of the original sizes.

    Raises:
        TypeError: ``dataset`` is not a :class:`datasets.Dataset`.
        ValueError: the image column is missing (the message lists the columns) or not an image feature, or
            ``styles`` / ``num_transforms`` are not accepted (see :func:`compose_style_shift`).
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"dataset must be a datasets.Dataset (one split of a DatasetDict), got {type(dataset).__name__}"
        )
    if image_column not in dataset.column_names:
        raise ValueError(
            f"image_column {image_column!r} is not a column of the dataset; its columns are {dataset.column_names}"
        )
    feature = dataset.features[image_column]
    if not isinstance(feature, ImageFeature):
        raise ValueError(f"image_column {image_column!r} must be a datasets.Image() feature, got {feature!r}")
    names = _check_styles(styles)
    seed = _check_seed(seed)
    _check_num_transforms(num_transforms, names)
    if not feature.decode:
        dataset = dataset.cast_column(image_column, ImageFeature())
    features = dataset.features.copy()
    features[image_column] = ImageFeature()

    def shift(image: Image.Image, index: int) -> dict[str, Image.Image]:
        return {image_column: compose_style_shift(image, _row_seed(seed, index), num_transforms, names)}

    # Never through the datasets cache: its fingerprint hashes `shift` but not the transforms it calls (dill pickles
    # module functions by reference), so an edited transform would silently return the old images.
    return dataset.map(
        shift,
        input_columns=image_column,
        with_indices=True,
        features=features,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc="Style-shifting images",
    )


def style_shift_splits(dataset: Dataset, seed: int = 0, image_column: str = "image") -> dict[str, Dataset]:
    """One style-shifted copy of ``dataset`` per style of :data:`STYLE_SHIFTS`, plus ``"mixed"`` (two different
    styles per row), for reporting retrieval per style.

    Args:
        dataset: as for :func:`make_style_shift_dataset`.
        seed: integer seed, shared by every split (each row still draws its own parameters).
        image_column: name of the image column.

    Returns:
        ``{style name: dataset, ..., "mixed": dataset}`` in :data:`STYLE_SHIFTS` order; each dataset has the rows and
        features of :func:`make_style_shift_dataset`.
    """
    splits = {
        name: make_style_shift_dataset(dataset, image_column, seed, styles=[name], num_transforms=1)
        for name in STYLE_SHIFTS
    }
    splits["mixed"] = make_style_shift_dataset(dataset, image_column, seed, num_transforms=2)
    return splits


__all__ = [
    "STYLE_SHIFTS",
    "StyleTransform",
    "blur",
    "compose_style_shift",
    "flat_colour",
    "hue_shift",
    "low_resolution",
    "make_style_shift_dataset",
    "outline",
    "posterize",
    "shape_warp",
    "style_shift",
    "style_shift_splits",
    "thick_outline",
]
