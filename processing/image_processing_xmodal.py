"""Image processor for XModal: PIL/NumPy backend, no torchvision required.

This file is shipped as remote code on the Hub: it imports only the standard library, numpy, PIL, torch and
transformers.
"""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack

from xmodal.hub import RemoteCodeSaveMixin

SingleImage = PIL.Image.Image | np.ndarray | torch.Tensor
XModalImageInput = SingleImage | list[SingleImage] | tuple[SingleImage, ...]

_NUM_CHANNELS = (1, 3, 4)
_ACCEPTED_INPUTS = (
    "a PIL.Image.Image; a numpy array or torch tensor shaped (H, W), (H, W, C) or (C, H, W) with C in (1, 3, 4) "
    "holding integers in [0, 255] (uint16: [0, 65535]) or floats in [0, 1] (or [0, 255]); "
    "a 4-D batch of such arrays; or a non-empty list or tuple of these"
)


def _describe(obj: object) -> str:
    """Describe a received object briefly for error messages."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return f"{type(obj).__name__} of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    text = repr(obj)
    return f"{type(obj).__name__} {text[:77] + '...' if len(text) > 80 else text}"


def _file_of(image: PIL.Image.Image) -> str:
    """` (file '<name>')` for an image opened from a named file, else an empty string."""
    filename = getattr(image, "filename", None)
    return f" (file {os.fspath(filename)!r})" if filename else ""


def _check_pixel_limit(image: PIL.Image.Image, where: str) -> None:
    """Refuse a PIL image above `PIL.Image.MAX_IMAGE_PIXELS` (PIL's decompression-bomb limit; `None` disables it).

    `PIL.Image.open` raises only above twice the limit and merely warns between the limit and twice the limit; the
    processor, which is what decodes a lazily opened image, refuses both. Reading the size does not decode the image.
    """
    limit = PIL.Image.MAX_IMAGE_PIXELS
    pixels = image.width * image.height
    if limit is not None and pixels > limit:
        raise ValueError(
            f"{where}{_file_of(image)} has {image.width}x{image.height} = {pixels} pixels, more than "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit} (PIL's decompression-bomb limit). If you trust the image, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (or set it to None) before processing it."
        )


def _split_images(obj: object, where: str) -> list[tuple[str, SingleImage]]:
    """Return `obj` as `(label, image)` pairs (a 4-D batch split into `where[i]`) or raise a descriptive error."""
    if isinstance(obj, PIL.Image.Image):
        if obj.width == 0 or obj.height == 0:
            raise ValueError(
                f"{where} is a zero-sized PIL image ({obj.width}x{obj.height}); expected {_ACCEPTED_INPUTS}."
            )
        _check_pixel_limit(obj, where)
        return [(where, obj)]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        if obj.ndim not in (2, 3, 4):
            raise ValueError(f"{where} is a {_describe(obj)}, which has no image layout; expected {_ACCEPTED_INPUTS}.")
        if 0 in obj.shape[-3:]:
            raise ValueError(f"{where} is a zero-sized image: {_describe(obj)}; expected {_ACCEPTED_INPUTS}.")
        return [(f"{where}[{index}]", image) for index, image in enumerate(obj)] if obj.ndim == 4 else [(where, obj)]
    hint = ""
    if isinstance(obj, (str, bytes, os.PathLike)) or hasattr(obj, "read"):
        hint = (
            " File paths, bytes, file objects and URLs are not loaded: open the image first, e.g. with PIL.Image.open."
        )
    raise TypeError(f"{where} is a {_describe(obj)}, which is not an image; expected {_ACCEPTED_INPUTS}.{hint}")


def _labelled_images(images: XModalImageInput) -> list[tuple[str, SingleImage]]:
    """
    Validate `images` and return them as a flat list of `(label, image)` pairs. The label names the image in error
    messages: `images` for a single image, `images[3]` for an element of a list or of a 4-D batch, `images[1][2]` for
    image 2 of a 4-D batch given as list element 1.

    Raises:
        TypeError: if an element is not a PIL image, numpy array or torch tensor (file paths are not loaded).
        ValueError: if the input holds no image, or an image is zero-sized, has an impossible number of dimensions or
            more pixels than `PIL.Image.MAX_IMAGE_PIXELS`.
    """
    if not isinstance(images, (list, tuple, str, bytes, np.ndarray, torch.Tensor, PIL.Image.Image)) and isinstance(
        images, Sequence
    ):
        images = list(images)  # e.g. a `datasets` Column (dataset["image"])
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"Received an empty {type(images).__name__} of images; expected {_ACCEPTED_INPUTS}.")
        flat = [pair for i, item in enumerate(images) for pair in _split_images(item, f"images[{i}]")]
    else:
        flat = _split_images(images, "images")
    if not flat:
        raise ValueError(f"Received an empty batch of images; expected {_ACCEPTED_INPUTS}.")
    return flat


def _make_image_list(images: XModalImageInput) -> list[SingleImage]:
    """Validate `images` and return them as a flat list of single images (see `_labelled_images`)."""
    return [image for _, image in _labelled_images(images)]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """
    Map pixel values to uint8 in [0, 255].

    uint8 is kept, bool becomes {0, 255}, uint16 is 16-bit data (divided by 257). Other integers in [0, 255] are
    8-bit, in [0, 65535] 16-bit, larger ones are scaled from the dtype's full range. Floats in [0, 1] are scaled by
    255, floats in [0, 255] are kept.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise ValueError("The image contains NaN or infinite values.")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Float images must hold values in [0, 1] (or [0, 255]); got values in [{low}, {high}]. "
                "Rescale the image first."
            )
        scaled = values * 255.0 if high <= 1 else values
    elif values.dtype.kind in "iu":
        low, high = int(values.min()), int(values.max())
        if low < 0:
            raise ValueError(f"Integer images must not hold negative values; got a minimum of {low}.")
        if values.dtype.kind == "u" and values.dtype.itemsize == 2:
            scaled = values / 257.0
        elif high <= 255:
            scaled = values
        elif high <= 65535:
            scaled = values / 257.0
        else:
            scaled = values * (255.0 / np.iinfo(values.dtype).max)
    else:
        raise TypeError(f"Unsupported pixel dtype {values.dtype}; expected an integer, bool or float dtype.")
    return np.round(scaled).astype(np.uint8)


def _has_transparency(image: PIL.Image.Image) -> bool:
    """Whether `image` has an alpha channel, an alpha palette or a transparent colour (`has_transparency_data`
    of Pillow >= 10.1)."""
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _pil_to_hwc(image: PIL.Image.Image, convert_rgb: bool) -> np.ndarray:
    """Convert a PIL image to a (H, W, C) uint8 array, RGB with transparency composited on white if `convert_rgb`."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # PIL's own conversion clips these to [0, 255] (16-bit images turn white): scale the values instead.
        gray = _to_uint8(np.asarray(image))[..., None]
        return np.repeat(gray, 3, axis=-1) if convert_rgb else gray
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these to other modes only via LA / RGBA
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if not convert_rgb:
        array = _to_uint8(np.asarray(image))
        return array[..., None] if array.ndim == 2 else array
    if _has_transparency(image):
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _decode(image: PIL.Image.Image, where: str) -> None:
    """Decode a lazily opened PIL image, turning PIL's many decoder errors into one `ValueError` naming the image."""
    try:
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, struct.error, ... for damaged files
        raise ValueError(
            f"{where}{_file_of(image)} could not be decoded ({type(err).__name__}: {err}): the image data is "
            "truncated or corrupted. Re-encode or drop the file (PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True makes PIL "
            "decode truncated files partially)."
        ) from err


def _channels_last(
    array: np.ndarray, input_data_format: ChannelDimension | str | None, from_torch: bool
) -> np.ndarray:
    """Return a 2-D or 3-D array as (H, W, C); ambiguous layouts follow `input_data_format`, else torch (C, H, W)
    and numpy (H, W, C) conventions."""
    if array.ndim == 2:
        return array[..., None]
    if input_data_format is not None:
        channels_first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
    else:
        first, last = array.shape[0] in _NUM_CHANNELS, array.shape[-1] in _NUM_CHANNELS
        if not (first or last):
            raise ValueError(
                f"Cannot find the channel dimension of an image of shape {array.shape}: expected (H, W, C) or "
                f"(C, H, W) with C in {_NUM_CHANNELS}."
            )
        channels_first = first and (from_torch or not last)
    array = np.moveaxis(array, 0, -1) if channels_first else array
    if array.shape[-1] not in _NUM_CHANNELS:
        raise ValueError(f"Images must have 1, 3 or 4 channels; got an image of shape {array.shape} (H, W, C).")
    return array


def _array_to_hwc(
    image: np.ndarray | torch.Tensor, input_data_format: ChannelDimension | str | None, convert_rgb: bool
) -> np.ndarray:
    """Convert an array or tensor to a (H, W, C) uint8 array; RGB (gray repeated, alpha on white) if `convert_rgb`."""
    from_torch = isinstance(image, torch.Tensor)
    if from_torch:
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    array = _to_uint8(_channels_last(np.asarray(image), input_data_format, from_torch))
    if not convert_rgb:
        return array
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float32) / 255.0
        return np.round(array[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return array


class XModalImageProcessor(RemoteCodeSaveMixin, PilBackend):
    r"""
    Image processor for XModal models, built on the PIL/NumPy backend (works without torchvision).

    Each image is converted to 8-bit RGB, resized to `size` (224x224, bicubic), optionally center-cropped to
    `crop_size` (off by default), rescaled by `rescale_factor` (1/255) and normalized with the ImageNet mean and
    standard deviation.

    Accepted inputs: a `PIL.Image.Image` of any mode (`1`, `L`, `LA`, `La`, `P`, `PA`, `RGB`, `RGBA`, `RGBa`, `RGBX`,
    `CMYK`, `YCbCr`, `LAB`, `HSV`, `I`, `I;16`, `I;16B`, `F`, ...), a numpy array or torch tensor of shape `(H, W)`, `(H, W, C)` or `(C, H, W)` with `C` in
    {1, 3, 4}, a 4-D batch of arrays, or a list of any of these. Conversion rules:

    - transparency (`RGBA`, `LA`, `P` with a transparent colour, 4-channel arrays) is composited on white;
    - 16-bit data (`I;16`, uint16 arrays, `I` images with values above 255) is scaled by 255/65535, not clipped;
    - floats in [0, 1] are scaled by 255 (floats in [0, 255] are kept);
    - an array whose first and last dimensions could both be channels is read as `(C, H, W)` for torch tensors
      and `(H, W, C)` for numpy arrays unless `input_data_format` says otherwise.

    File paths, bytes, file objects and URLs are not loaded. Any other input raises a `TypeError` (not an image,
    unsupported dtype) or a `ValueError` (empty list, zero-sized image, unknown layout, NaN/infinite or out-of-range
    values, more pixels than `PIL.Image.MAX_IMAGE_PIXELS`, a lazily opened file that is truncated or corrupted) whose
    message starts with the image it is about (`images`, `images[3]`) and names what was received.

    All `ImagesKwargs` (`do_resize`, `size`, `resample`, `do_center_crop`, `crop_size`, `do_rescale`,
    `rescale_factor`, `do_normalize`, `image_mean`, `image_std`, `do_convert_rgb`, `input_data_format`,
    `return_tensors`, ...) can be set at construction or per call.

    Returns:
        `BatchFeature` with `pixel_values`: float32 of shape `(batch_size, 3, height, width)` when `return_tensors`
        is `"pt"` or `"np"`, otherwise a list of `batch_size` arrays of shape `(3, height, width)`.

    Example:

    ```python
    >>> from PIL import Image
    >>> processor = XModalImageProcessor()
    >>> processor(Image.new("RGB", (640, 480)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 224, 224])
    ```
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = {"height": 224, "width": 224}
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = tuple(IMAGENET_DEFAULT_MEAN)
    image_std = tuple(IMAGENET_DEFAULT_STD)
    do_convert_rgb = True

    def _prepare_image_like_inputs(
        self, images: XModalImageInput, *args: Any, expected_ndims: int = 3, **kwargs: Unpack[ImagesKwargs]
    ) -> list[np.ndarray]:
        """Validate and convert every image with `process_image`; any error names the image (`images[3]: ...`)."""
        prepared = []
        for where, image in _labelled_images(images):
            if isinstance(image, PIL.Image.Image):
                _decode(image, where)
            try:
                prepared.append(self.process_image(image, *args, **kwargs))
            except (ValueError, TypeError) as err:
                raise (TypeError if isinstance(err, TypeError) else ValueError)(f"{where}: {err}") from err
        return prepared

    def fetch_images(self, image_url_or_urls: XModalImageInput) -> list[SingleImage]:
        """Validate the input and return a flat list of images. Unlike the base class, strings are never loaded."""
        return _make_image_list(image_url_or_urls)

    def _prepare_images_structure(self, images: XModalImageInput, expected_ndims: int = 3) -> list[SingleImage]:
        """Flatten the input with `fetch_images` (the base class would also accept nested lists and load URLs)."""
        return self.fetch_images(images)

    def process_image(
        self,
        image: SingleImage,
        do_convert_rgb: bool | None = None,
        input_data_format: ChannelDimension | str | None = None,
        **kwargs: Unpack[ImagesKwargs],
    ) -> np.ndarray:
        """Convert one image to a channels-first uint8 array (3 channels when `do_convert_rgb`)."""
        if isinstance(image, PIL.Image.Image):
            array = _pil_to_hwc(image, bool(do_convert_rgb))
        else:
            array = _array_to_hwc(image, input_data_format, bool(do_convert_rgb))
        return np.ascontiguousarray(np.moveaxis(array, -1, 0))


__all__ = ["XModalImageProcessor"]
