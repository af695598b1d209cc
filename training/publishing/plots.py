"""Pictures for the model card, drawn with PIL only: a loss-curve line chart and a strip of the images retrieved for
one text query."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence

import torch
from datasets import Dataset
from PIL import Image, ImageDraw, ImageFont, ImageOps

from xmodal import XModalModel, XModalProcessor
from xmodal.training.evaluation.evaluator import embed_dataset

# matplotlib's "tab10" colours: distinct, and readable on white
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_INK, _GRID, _MATCH, _MISS = (40, 40, 40), (225, 225, 225), (44, 160, 44), (200, 200, 200)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About `count` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering `[low, high]`."""
    if not (math.isfinite(low) and math.isfinite(high)) or high < low:
        raise ValueError(f"nice_ticks needs finite low <= high, got {low!r}, {high!r}.")
    if high == low:
        low, high = low - 0.5, high + 0.5
    raw_step = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    ticks = [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]
    return [round(tick, 12) for tick in ticks]


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:,.{decimals}f}"


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over `window` points (fewer at the ends), so the smoothed line does not lag."""
    half = window // 2
    return [
        sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
        for i in range(len(values))
    ]


def _lighter(colour: tuple[int, int, int], amount: float = 0.65) -> tuple[int, int, int]:
    return tuple(round(c + (255 - c) * amount) for c in colour)  # type: ignore[return-value]


def plot_loss_curve(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "Training loss",
    *,
    xlabel: str = "optimizer step",
    ylabel: str = "loss",
    smoothing_window: int | None = None,
    size: tuple[int, int] = (800, 480),
) -> None:
    """Writes a PNG line chart of one or more loss curves (one value per step), with numbered axes and a legend.

    Curves of 20 points or more are drawn faintly as recorded, with a bold centred moving average on top over
    `smoothing_window` points (default: a 25th of the curve; 1 draws only the recorded values). Non-finite values
    are left out.

    Args:
        curves: `{legend label: [loss at step 1, loss at step 2, ...]}`, one colour each (at most 10).
        path: where to write the PNG.
    """
    if not curves or len(curves) > len(PALETTE):
        raise ValueError(f"plot_loss_curve takes 1 to {len(PALETTE)} curves, got {len(curves)}.")
    if smoothing_window is not None and smoothing_window < 1:
        raise ValueError(f"smoothing_window is a number of points (>= 1), got {smoothing_window}.")
    points = {
        label: [(step, float(v)) for step, v in enumerate(values, start=1) if math.isfinite(float(v))]
        for label, values in curves.items()
    }
    if any(not p for p in points.values()):
        empty = [label for label, p in points.items() if not p]
        raise ValueError(f"plot_loss_curve got curves without any finite value: {empty}.")
    width, height = size
    left, right, top, bottom = 78, 24, 48, 62
    plot_w, plot_h = width - left - right, height - top - bottom
    ys = [y for p in points.values() for _, y in p]
    y_ticks = nice_ticks(min(ys), max(ys))
    x_ticks = nice_ticks(1, max(len(values) for values in curves.values()))
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo or 1) * plot_w, top + (y_hi - y) / (y_hi - y_lo or 1) * plot_h)

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    small, normal, large = _font(13), _font(15), _font(18)
    for tick in y_ticks:
        _, y = to_pixel(x_lo, tick)
        draw.line([(left, y), (left + plot_w, y)], fill=_GRID)
        draw.text((left - 8, y), _tick_label(tick, y_ticks[1] - y_ticks[0]), fill=_INK, font=small, anchor="rm")
    for tick in x_ticks:
        x, _ = to_pixel(tick, y_lo)
        draw.line([(x, top), (x, top + plot_h)], fill=_GRID)
        draw.text(
            (x, top + plot_h + 8), _tick_label(tick, x_ticks[1] - x_ticks[0]), fill=_INK, font=small, anchor="mt"
        )
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=_INK)
    draw.text((width / 2, 14), title, fill=_INK, font=large, anchor="mt")
    draw.text((left + plot_w / 2, height - 10), xlabel, fill=_INK, font=normal, anchor="ms")
    label_image = Image.new("RGB", (plot_h, 22), "white")
    ImageDraw.Draw(label_image).text((plot_h / 2, 11), ylabel, fill=_INK, font=normal, anchor="mm")
    image.paste(label_image.rotate(90, expand=True), (4, top))

    for colour, curve in zip(PALETTE, points.values()):
        steps, values = [s for s, _ in curve], [v for _, v in curve]
        window = smoothing_window or max(1, len(values) // 25)
        smoothed = len(values) >= 20 and window > 1
        raw_colour = _lighter(colour) if smoothed else colour
        line = [to_pixel(s, v) for s, v in curve]
        if len(line) > 1:
            draw.line(line, fill=raw_colour, width=1 if smoothed else 2)
        else:
            x, y = line[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if smoothed:
            draw.line([to_pixel(s, v) for s, v in zip(steps, _smooth(values, window))], fill=colour, width=3)

    row_height, swatch = 20, 24
    legend_w = swatch + 14 + max(draw.textlength(label, font=normal) for label in points)
    legend_h = row_height * len(points) + 8
    x0, y0 = left + plot_w - legend_w - 12, top + 10
    draw.rectangle([x0, y0, x0 + legend_w + 6, y0 + legend_h], fill="white", outline=_GRID)
    for row, (colour, label) in enumerate(zip(PALETTE, points)):
        y = y0 + 4 + row * row_height + row_height / 2
        draw.line([(x0 + 6, y), (x0 + 6 + swatch, y)], fill=colour, width=3)
        draw.text((x0 + 14 + swatch, y), label, fill=_INK, font=normal, anchor="lm")
    image.save(path, format="PNG")


def retrieval_example_picture(
    query: str,
    images: Sequence[Image.Image],
    scores: Sequence[float],
    path: str | os.PathLike,
    *,
    matches: Sequence[bool] | None = None,
    thumbnail_size: int = 128,
) -> None:
    """Writes a PNG strip of the images retrieved for one text query, best first, each labelled with its rank and
    similarity score.

    Args:
        query: the text query, printed above the strip.
        images: the retrieved images, best first.
        scores: their similarity to the query (same length as `images`).
        path: where to write the PNG.
        matches: optionally, which images are the query's true match (framed in green).
        thumbnail_size: side of each (square) thumbnail in pixels; small images are enlarged without blurring.
    """
    if not images or len(images) != len(scores) or (matches is not None and len(matches) != len(images)):
        raise ValueError(
            f"retrieval_example_picture needs one score (and match flag) per image and at least one image, got "
            f"{len(images)} images, {len(scores)} scores, {None if matches is None else len(matches)} match flags."
        )
    pad, frame = 12, 4
    cell = thumbnail_size + 2 * frame
    normal, small = _font(16), _font(14)
    lines = textwrap.wrap(f"Query: \u201c{query}\u201d", width=max(20, (pad + len(images) * (cell + pad)) // 9))
    header = 10 + 22 * len(lines)
    width, height = pad + len(images) * (cell + pad), header + cell + 34
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    for row, line in enumerate(lines):
        draw.text((pad, 8 + 22 * row), line, fill=_INK, font=normal)
    for rank, (image, score) in enumerate(zip(images, scores)):
        x, y = pad + rank * (cell + pad), header
        is_match = matches is not None and matches[rank]
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_MATCH if is_match else _MISS)
        image = image.convert("RGB")
        grow = image.width < thumbnail_size and image.height < thumbnail_size
        resample = Image.Resampling.NEAREST if grow else Image.Resampling.LANCZOS
        thumbnail = ImageOps.contain(image, (thumbnail_size, thumbnail_size), method=resample)
        offset = ((thumbnail_size - thumbnail.width) // 2, (thumbnail_size - thumbnail.height) // 2)
        picture.paste(thumbnail, (x + frame + offset[0], y + frame + offset[1]))
        label = f"#{rank + 1}  {score:.3f}" + ("  match" if is_match else "")
        draw.text((x + cell / 2, y + cell + 8), label, fill=_INK, font=small, anchor="mt")
    picture.save(path, format="PNG")


@torch.no_grad()
def plot_retrieval_example(
    model: XModalModel,
    processor: XModalProcessor,
    dataset: Dataset,
    path: str | os.PathLike,
    *,
    query_index: int = 0,
    k: int = 5,
    image_column: str = "image",
    text_column: str = "text",
    **embed_kwargs: object,
) -> list[int]:
    """Retrieves the top-`k` images of `dataset` for the caption of row `query_index` and draws them with
    `retrieval_example_picture` (the row's own image framed as the true match). Returns the retrieved row indices.

    `embed_kwargs` go to `embed_dataset` (batch_size, max_length, show_progress)."""
    if not 0 <= query_index < len(dataset):
        raise ValueError(f"query_index {query_index} is outside the dataset's {len(dataset)} rows.")
    image_embeds, text_embeds = embed_dataset(
        model, processor, dataset, image_column=image_column, text_column=text_column, **embed_kwargs
    )
    scores, indices = (text_embeds[query_index] @ image_embeds.t()).topk(min(k, len(dataset)))
    rows = indices.tolist()
    retrieval_example_picture(
        dataset[query_index][text_column],
        [dataset[row][image_column] for row in rows],
        scores.tolist(),
        path,
        matches=[row == query_index for row in rows],
    )
    return rows


__all__ = ["PALETTE", "nice_ticks", "plot_loss_curve", "plot_retrieval_example", "retrieval_example_picture"]
