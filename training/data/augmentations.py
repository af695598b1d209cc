"""Multi-view data augmentations for contrastive image-text pretraining (SimCLR / SLIP / DeCLIP style).

The augmentations work on already-processed torch batches (the output of the xmodal processor), so they can run
inside a DataLoader collator, in worker processes:

    image_augmentation = ImageAugmentation(patch_mask_ratio=0.25)
    text_augmentation = TextAugmentation()
    views = make_views(pixel_values, input_ids, attention_mask, image_augmentation, text_augmentation, generator)

Every callable takes an optional `torch.Generator` (the global RNG is used without one), draws its random numbers
on the generator's device and never modifies its inputs in place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma weights (torchvision uses 0.2989 for red; 0.299 makes them sum to 1 so grey stays grey).
_GRAYSCALE_WEIGHTS = (0.299, 0.587, 0.114)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers on the generator's device (CPU without a generator)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device)


def _randint(high: int, generator: torch.Generator | None) -> int:
    """One integer uniform in [0, high)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, high, (1,), generator=generator, device=device).item())


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_interval(name: str, value: tuple[float, float], low: float, high: float) -> None:
    """`value` must be a pair (lo, hi) with low < lo <= hi <= high."""
    if len(value) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
        raise ValueError(f"{name} must be a pair of finite numbers (lo, hi), got {value!r}")
    lo, hi = value
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} < lo <= hi <= {high}, got {value!r}")


@dataclass
class ImageAugmentation:
    """Random resized crop, colour jitter and patch masking of a normalised image batch.

    Args:
        crop_scale: range of the area fraction of the random resized crop, `0 < lo <= hi <= 1`.
        crop_ratio: range of the aspect ratio (width / height) of the crop, `0 < lo <= hi`.
        brightness: brightness jitter strength `>= 0`; the factor is uniform in `[max(0, 1 - s), 1 + s]`.
        contrast: contrast jitter strength `>= 0` (factor as for brightness).
        saturation: saturation jitter strength `>= 0` (factor as for brightness).
        grayscale_probability: probability in `[0, 1]` that a sample becomes grey (luma in every channel), after the
            colour jitter.
        patch_mask_ratio: fraction in `[0, 1]` of the `patch_size x patch_size` patches set to 0 in the normalised
            image; 0 disables masking. Only whole patches count: `(H // patch_size) * (W // patch_size)` of them.
        patch_size: side of a masked patch in pixels, `>= 1`.
        image_mean: per-channel mean the processor subtracted.
        image_std: per-channel standard deviation the processor divided by (all `> 0`).

    The colour jitter is applied in un-normalised `[0, 1]` space (clamped to `[0, 1]` after each step) and the
    result is normalised again with `image_mean` / `image_std`.
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_probability: float = 0.0
    patch_mask_ratio: float = 0.0
    patch_size: int = 16
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        _check_interval("crop_scale", self.crop_scale, 0.0, 1.0)
        _check_interval("crop_ratio", self.crop_ratio, 0.0, math.inf)
        for name in ("brightness", "contrast", "saturation"):
            _check_range(name, getattr(self, name), 0.0, math.inf)
        _check_range("grayscale_probability", self.grayscale_probability, 0.0, 1.0)
        _check_range("patch_mask_ratio", self.patch_mask_ratio, 0.0, 1.0)
        if not isinstance(self.patch_size, int) or isinstance(self.patch_size, bool) or self.patch_size < 1:
            raise ValueError(f"patch_size must be an integer >= 1, got {self.patch_size!r}")
        if len(self.image_mean) == 0 or not all(
            isinstance(m, (int, float)) and math.isfinite(m) for m in self.image_mean
        ):
            raise ValueError(f"image_mean must be a non-empty tuple of finite numbers, got {self.image_mean!r}")
        if len(self.image_std) != len(self.image_mean) or not all(
            isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in self.image_std
        ):
            raise ValueError(
                f"image_std must be a tuple of finite numbers > 0 with one entry per channel of image_mean "
                f"({len(self.image_mean)}), got {self.image_std!r}"
            )

    # ------------------------------------------------------------------------------------------------ crop
    def _crop_box(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """Top, left, height, width of one random resized crop (torchvision's `RandomResizedCrop.get_params`)."""
        area = height * width
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        scale_lo, scale_hi = self.crop_scale
        for _ in range(10):
            u = _rand((2,), generator).tolist()
            target_area = area * (scale_lo + (scale_hi - scale_lo) * u[0])
            aspect_ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(height - h + 1, generator)
                left = _randint(width - w + 1, generator)
                return top, left, h, w
        # Fallback: centre crop with the aspect ratio clipped to crop_ratio.
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            w, h = width, int(round(width / self.crop_ratio[0]))
        elif in_ratio > self.crop_ratio[1]:
            h, w = height, int(round(height * self.crop_ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _random_resized_crop(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, C, H, W)`: an independent crop per sample, resized back to `H x W` (bilinear)."""
        batch, _, height, width = images.shape
        out = torch.empty_like(images)
        for index in range(batch):
            top, left, h, w = self._crop_box(height, width, generator)
            crop = images[index : index + 1, :, top : top + h, left : left + w]
            if (h, w) != (height, width):
                crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
            out[index] = crop[0]
        return out

    # ------------------------------------------------------------------------------------------ colour jitter
    def _factors(self, strength: float, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """`(B,)` factors uniform in `[max(0, 1 - strength), 1 + strength]`."""
        low, high = max(0.0, 1.0 - strength), 1.0 + strength
        return low + (high - low) * _rand((batch,), generator)

    @staticmethod
    def _grayscale(images: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, 1, H, W)` luma (the image itself when C != 3)."""
        if images.shape[1] != 3:
            return images.mean(dim=1, keepdim=True)
        weights = images.new_tensor(_GRAYSCALE_WEIGHTS).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)

    def _colour_jitter(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """`(B, C, H, W)` normalised -> `(B, C, H, W)` normalised; brightness, contrast, saturation in `[0, 1]` space."""
        batch, channels = images.shape[:2]
        mean = images.new_tensor(self.image_mean).view(1, channels, 1, 1)
        std = images.new_tensor(self.image_std).view(1, channels, 1, 1)
        x = images * std + mean
        if self.brightness > 0:
            factor = self._factors(self.brightness, batch, generator).to(x).view(batch, 1, 1, 1)
            x = (x * factor).clamp(0.0, 1.0)
        if self.contrast > 0:
            factor = self._factors(self.contrast, batch, generator).to(x).view(batch, 1, 1, 1)
            gray_mean = self._grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (factor * x + (1.0 - factor) * gray_mean).clamp(0.0, 1.0)
        if self.saturation > 0 and channels == 3:
            factor = self._factors(self.saturation, batch, generator).to(x).view(batch, 1, 1, 1)
            x = (factor * x + (1.0 - factor) * self._grayscale(x)).clamp(0.0, 1.0)
        return (x - mean) / std

    def _random_grayscale(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """`(B, C, H, W)` normalised -> the same with `grayscale_probability` of the samples grey (in `[0, 1]` space)."""
        batch, channels = images.shape[:2]
        grey = (_rand((batch,), generator) < self.grayscale_probability).to(images.device).view(batch, 1, 1, 1)
        mean = images.new_tensor(self.image_mean).view(1, channels, 1, 1)
        std = images.new_tensor(self.image_std).view(1, channels, 1, 1)
        luma = self._grayscale(images * std + mean)
        return torch.where(grey, (luma - mean) / std, images)

    # ------------------------------------------------------------------------------------------ patch masking
    def patch_mask(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`(B, H, W)` bool pixel mask with exactly `round(patch_mask_ratio * num_patches)` patches per sample True.

        `num_patches = (H // patch_size) * (W // patch_size)`; pixels of partial patches at the right and bottom
        edges are never masked.
        """
        size = self.patch_size
        grid_h, grid_w = height // size, width // size
        num_patches = grid_h * grid_w
        num_masked = round(self.patch_mask_ratio * num_patches)
        if num_masked == 0:
            return torch.zeros(batch, height, width, dtype=torch.bool)
        order = _rand((batch, num_patches), generator).cpu().argsort(dim=1)
        patches = torch.zeros(batch, num_patches, dtype=torch.bool)
        patches.scatter_(1, order[:, :num_masked], True)
        pixels = patches.view(batch, grid_h, 1, grid_w, 1).expand(batch, grid_h, size, grid_w, size)
        pixels = pixels.reshape(batch, grid_h * size, grid_w * size)
        return F.pad(pixels, (0, width - grid_w * size, 0, height - grid_h * size), value=False)

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a normalised image batch.

        Args:
            pixel_values: `(B, C, H, W)` floating-point images, normalised with `image_mean` / `image_std`;
                `C == len(image_mean)`.
            generator: optional RNG for reproducibility.

        Returns:
            A new `(B, C, H, W)` tensor of the same dtype and device: per sample random resized crop, colour
            jitter, random greyscale, then patch masking.
        """
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have shape (B, C, H, W), got {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        batch, channels, height, width = pixel_values.shape
        if channels != len(self.image_mean):
            raise ValueError(
                f"pixel_values has {channels} channels but image_mean / image_std have {len(self.image_mean)}"
            )
        if batch == 0 or height == 0 or width == 0:
            return pixel_values.clone()
        if self.patch_mask_ratio > 0 and (height < self.patch_size or width < self.patch_size):
            raise ValueError(
                f"patch_size ({self.patch_size}) is larger than the image ({height}x{width}) with patch_mask_ratio > 0"
            )

        dtype = pixel_values.dtype
        compute_dtype = torch.promote_types(dtype, torch.float32)
        images = pixel_values.to(compute_dtype)  # a view when already compute_dtype: never written to
        images = self._random_resized_crop(images, generator)
        if self.brightness > 0 or self.contrast > 0 or self.saturation > 0:
            images = self._colour_jitter(images, generator)
        if self.grayscale_probability > 0:
            images = self._random_grayscale(images, generator)
        if self.patch_mask_ratio > 0:
            mask = self.patch_mask(batch, height, width, generator).to(images.device)
            images = images.masked_fill(mask.unsqueeze(1), 0.0)
        return images.to(dtype)


@dataclass
class TextAugmentation:
    """Random token dropping, then random masking, of a tokenised batch.

    Args:
        mask_probability: probability in `[0, 1]` that a remaining content token is replaced by `mask_token_id`.
        drop_probability: probability in `[0, 1]` that a content token is deleted (the rest shift left).
        mask_token_id: id written in place of masked tokens (`>= 0`).
        pad_token_id: id written into the padding freed by dropped tokens (`>= 0`).
        special_token_ids: ids that are never dropped or masked (by default [PAD]=0, [CLS]=2, [SEP]=3, [MASK]=4;
            [UNK]=1 is an ordinary token).

    Content tokens are those with `attention_mask == 1`, an id not in `special_token_ids` and not `pad_token_id`.
    A row whose content tokens would all be dropped keeps all of them (it is left undropped).
    """

    mask_probability: float = 0.15
    drop_probability: float = 0.1
    mask_token_id: int = 4
    pad_token_id: int = 0
    special_token_ids: tuple[int, ...] = (0, 2, 3, 4)

    def __post_init__(self) -> None:
        _check_range("mask_probability", self.mask_probability, 0.0, 1.0)
        _check_range("drop_probability", self.drop_probability, 0.0, 1.0)
        for name in ("mask_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.special_token_ids = tuple(self.special_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.special_token_ids):
            raise ValueError(f"special_token_ids must be a tuple of integers >= 0, got {self.special_token_ids!r}")

    def content_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(B, L)` bool: True on tokens that may be dropped or masked."""
        special = torch.tensor(self.special_token_ids, dtype=input_ids.dtype, device=input_ids.device)
        return attention_mask.bool() & ~torch.isin(input_ids, special) & (input_ids != self.pad_token_id)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop, then mask, content tokens.

        Args:
            input_ids: `(B, L)` integer token ids.
            attention_mask: `(B, L)` 0/1 mask (integer or bool), 1 on real tokens.
            generator: optional RNG for reproducibility.

        Returns:
            New `(input_ids, attention_mask)`, both `(B, L)` with the input dtypes. Kept tokens keep their order and
            move left over dropped ones; the freed positions at the end hold `pad_token_id` with mask 0.
        """
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 2:
                raise ValueError(f"{name} must have shape (B, L), got {tuple(tensor.shape)}")
        if input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ in shape"
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be an integer or bool tensor, got {attention_mask.dtype}")

        batch, length = input_ids.shape
        device = input_ids.device
        content = self.content_mask(input_ids, attention_mask)
        drop_draw = _rand((batch, length), generator).to(device)
        mask_draw = _rand((batch, length), generator).to(device)

        # Drop: rows that would lose every content token are left alone.
        drop = (drop_draw < self.drop_probability) & content
        loses_all = (drop.sum(dim=1) == content.sum(dim=1)) & content.any(dim=1)
        drop &= ~loses_all.unsqueeze(1)
        keep = ~drop
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept positions first, in order
        valid = torch.arange(length, device=device).unsqueeze(0) < keep.sum(dim=1, keepdim=True)
        ids = input_ids.gather(1, order).masked_fill(~valid, self.pad_token_id)
        mask = attention_mask.gather(1, order).masked_fill(~valid, 0)
        content = content.gather(1, order) & valid

        # Mask the remaining content tokens.
        masked = (mask_draw < self.mask_probability) & content
        ids = ids.masked_fill(masked, self.mask_token_id)
        return ids, mask


HORIZONTAL_FLIP_MODES: tuple[str, ...] = ("off", "on", "mirror_text")
"""`off`: never flip; `on`: flip the image only (for text that never names a side); `mirror_text`: flip the image
and exchange the words left and right in its texts, so that they still describe it."""

# "left"/"right" as words, and as the stem of "leftwards"/"rightward"; not "leftover" or "righteous"
_SIDE_WORD = re.compile(r"\b(left|right)(?=(?:wards?)?\b)", re.IGNORECASE)
_OTHER_SIDE = {"left": "right", "right": "left"}


def mirror_left_right(text: str) -> str:
    """The text of the mirrored image: every "left" and "right" exchanged ("on the left" -> "on the right", "top right"
    -> "top left", "leftwards" -> "rightwards"), keeping the capitalisation of the first letter."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        other = _OTHER_SIDE[word.lower()]
        return other.capitalize() if word[0].isupper() else other

    return _SIDE_WORD.sub(swap, text)


@dataclass
class PairAugmentation:
    """Train-time augmentation of image-text pairs: a random horizontal flip whose texts follow (`draw_flips`,
    `mirror_texts`, `flip_images`), then the image augmentation (random resized crop, colour jitter, greyscale) of
    each image (`image`).

    Args:
        image: the per-image augmentation, or None for none.
        horizontal_flip: one of :data:`HORIZONTAL_FLIP_MODES`.
        flip_probability: probability in `[0, 1]` that a pair is flipped (when `horizontal_flip` is not `off`).
    """

    image: ImageAugmentation | None = None
    horizontal_flip: str = "mirror_text"
    flip_probability: float = 0.5

    def __post_init__(self) -> None:
        if self.horizontal_flip not in HORIZONTAL_FLIP_MODES:
            raise ValueError(
                f"horizontal_flip must be one of {', '.join(HORIZONTAL_FLIP_MODES)}, got {self.horizontal_flip!r}"
            )
        _check_range("flip_probability", self.flip_probability, 0.0, 1.0)

    def draw_flips(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`(B,)` bool: which pairs of a batch are flipped (none with `horizontal_flip="off"`)."""
        if self.horizontal_flip == "off" or self.flip_probability == 0:
            return torch.zeros(batch, dtype=torch.bool)
        return (_rand((batch,), generator) < self.flip_probability).cpu()

    def mirror_texts(self, texts: Sequence[str], flips: torch.Tensor) -> list[str]:
        """`texts[i]` as it reads for pair i after the flips (`mirror_left_right` where flipped, with `mirror_text`)."""
        if self.horizontal_flip != "mirror_text":
            return list(texts)
        return [mirror_left_right(text) if flip else text for text, flip in zip(texts, flips.tolist(), strict=True)]

    def flip_images(self, pixel_values: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` images -> a new tensor with the flipped ones mirrored along the width."""
        return torch.where(flips.to(pixel_values.device).view(-1, 1, 1, 1), pixel_values.flip(-1), pixel_values)


def make_views(
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_augmentation: ImageAugmentation | None,
    text_augmentation: TextAugmentation | None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Two independently augmented views of an image-text batch.

    Args:
        pixel_values: `(B, C, H, W)` normalised images.
        input_ids: `(B, L)` token ids.
        attention_mask: `(B, L)` 0/1 mask.
        image_augmentation: augmentation of the images, or None for unaugmented copies.
        text_augmentation: augmentation of the texts, or None for unaugmented copies.
        generator: optional RNG; the two views use successive draws from it.

    Returns:
        `pixel_values` `(B, C, H, W)`, `input_ids` `(B, L)`, `attention_mask` `(B, L)` (view 1) and
        `second_view_pixel_values`, `second_view_input_ids`, `second_view_attention_mask` (view 2, same shapes).
    """
    views: dict[str, torch.Tensor] = {}
    for prefix in ("", "second_view_"):
        if image_augmentation is None:
            views[f"{prefix}pixel_values"] = pixel_values.clone()
        else:
            views[f"{prefix}pixel_values"] = image_augmentation(pixel_values, generator)
        if text_augmentation is None:
            ids, mask = input_ids.clone(), attention_mask.clone()
        else:
            ids, mask = text_augmentation(input_ids, attention_mask, generator)
        views[f"{prefix}input_ids"] = ids
        views[f"{prefix}attention_mask"] = mask
    return views


__all__ = [
    "HORIZONTAL_FLIP_MODES",
    "ImageAugmentation",
    "PairAugmentation",
    "TextAugmentation",
    "make_views",
    "mirror_left_right",
]
