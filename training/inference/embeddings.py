"""Embeddings from a pretrained xmodal model: images (paths or PIL images) and texts to L2-normalised float32
vectors on the CPU, in batches, and the ranking of scored items.

Every function reads the model through the `XModalModel` API (`get_image_features`, `get_text_features`), so any
xmodal model with both towers works (`XModalModel`, `XModalForPreTraining`, `XModalForImageTextRetrieval`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from xmodal import XModalModel, XModalProcessor

if TYPE_CHECKING:
    pass


ImageInput = PIL.Image.Image | str | os.PathLike
"""An image, or the path of an image file."""


_Item = TypeVar("_Item")


def load_image(image: ImageInput) -> PIL.Image.Image:
    """An RGB PIL image from a PIL image or a file path (EXIF orientation applied).

    Raises:
        FileNotFoundError: the path is not a file.
        ValueError: the file is not an image PIL can read.
        TypeError: `image` is neither a PIL image nor a path.
    """
    if isinstance(image, PIL.Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"Expected a PIL image or the path of an image file, got {type(image).__name__}: {image!r}.")
    if not os.path.isfile(image):
        raise FileNotFoundError(f"Image file {os.fspath(image)!r} does not exist.")
    try:
        with PIL.Image.open(image) as opened:
            return PIL.ImageOps.exif_transpose(opened).convert("RGB")
    except PIL.UnidentifiedImageError as err:
        raise ValueError(f"{os.fspath(image)!r} is not an image file PIL can read.") from err


def _first_parameter(model: torch.nn.Module) -> torch.Tensor:
    """Where (device) and in what dtype the model's inputs go."""
    return next(model.parameters())


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


@torch.no_grad()
def embed_images(
    model: XModalModel, processor: XModalProcessor, images: Sequence[ImageInput], batch_size: int = 32
) -> torch.Tensor:
    """L2-normalised image embeddings `(len(images), projection_dim)` (float32, CPU), in batches of `batch_size`.

    `images` are PIL images or file paths (loaded one batch at a time). Puts the model in eval mode.
    """
    _check_batch_size(batch_size)
    model.eval()
    parameter = _first_parameter(model)
    embeddings = []
    for start in range(0, len(images), batch_size):
        batch = [load_image(image) for image in images[start : start + batch_size]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(parameter.device, parameter.dtype)
        features = model.get_image_features(pixel_values=pixel_values).pooler_output
        embeddings.append(F.normalize(features.float(), dim=-1).cpu())
    if not embeddings:
        raise ValueError("embed_images got no images.")
    return torch.cat(embeddings)


@torch.no_grad()
def embed_texts(
    model: XModalModel,
    processor: XModalProcessor,
    texts: Sequence[str],
    batch_size: int = 256,
    max_length: int | None = None,
) -> torch.Tensor:
    """L2-normalised text embeddings `(len(texts), projection_dim)` (float32, CPU), in batches of `batch_size`.

    Texts longer than `max_length` tokens (default: the tokenizer's `model_max_length`) are truncated. Puts the model
    in eval mode.
    """
    _check_batch_size(batch_size)
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise TypeError(f"texts must be a sequence of strings, got {texts!r}.")
    model.eval()
    device = _first_parameter(model).device
    embeddings = []
    for start in range(0, len(texts), batch_size):
        inputs = processor(
            text=list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        features = model.get_text_features(**inputs).pooler_output
        embeddings.append(F.normalize(features.float(), dim=-1).cpu())
    if not embeddings:
        raise ValueError("embed_texts got no texts.")
    return torch.cat(embeddings)


def _check_top_k(top_k: object) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (all), got {top_k!r}.")


def _ranked(scores: torch.Tensor, items: Sequence[_Item], top_k: int | None) -> list[tuple[_Item, float]]:
    """`(item, score)` pairs by decreasing score `(len(items),)` (ties keep the items' order), the first `top_k`
    (all when None)."""
    _check_top_k(top_k)
    order = torch.sort(scores, descending=True, stable=True).indices[:top_k].tolist()
    return [(items[index], float(scores[index])) for index in order]


__all__ = [
    "ImageInput",
    "embed_images",
    "embed_texts",
    "load_image",
]
