"""Tests of the multi-view image and text augmentations in `xmodal.training.data.augmentations`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmodal.training.data.augmentations import ImageAugmentation, TextAugmentation, make_views

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, CLS, SEP, MASK)
IDENTITY = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "brightness": 0.0, "contrast": 0.0, "saturation": 0.0}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int = 4, size: int = 32, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Normalised (mean 0.5, std 0.5) images: uniform in [-1, 1)."""
    return torch.rand(batch, channels, size, size, generator=_gen(seed)) * 2 - 1


def _texts(lengths: list[int], max_length: int, seed: int = 0, low: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows [CLS] content... [SEP] [PAD]...; `lengths` counts content tokens (ids in [low, 100))."""
    g = _gen(seed)
    ids = torch.full((len(lengths), max_length), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), max_length, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = CLS
        ids[row, 1 : n + 1] = torch.randint(low, 100, (n,), generator=g)
        ids[row, n + 1] = SEP
        mask[row, : n + 2] = 1
    return ids, mask


def _is_subsequence(short: list[int], long: list[int]) -> bool:
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


# ---------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_image_shape_and_dtype_preserved(dtype: torch.dtype) -> None:
    images = _images(3, 24).to(dtype)
    out = ImageAugmentation(patch_mask_ratio=0.3, patch_size=8)(images, _gen(1))
    assert out.shape == images.shape
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()


def test_image_input_not_modified() -> None:
    images = _images()
    before = images.clone()
    out = ImageAugmentation(patch_mask_ratio=0.5, patch_size=8)(images, _gen(0))
    assert torch.equal(images, before)
    assert out.data_ptr() != images.data_ptr()
    assert not torch.equal(out, images)


def test_image_identity_settings_return_input() -> None:
    images = _images()
    out = ImageAugmentation(**IDENTITY)(images, _gen(0))
    assert torch.allclose(out, images)
    assert out.data_ptr() != images.data_ptr()
    assert not torch.allclose(ImageAugmentation()(images, _gen(0)), images)


def test_image_determinism() -> None:
    images = _images()
    aug = ImageAugmentation(patch_mask_ratio=0.25, patch_size=8)
    first, second = aug(images, _gen(123)), aug(images, _gen(123))
    assert torch.equal(first, second)
    assert not torch.allclose(first, aug(images, _gen(124)))


def test_image_crop_area_and_per_sample_independence() -> None:
    # Horizontal ramp I[..., y, x] = x: a 16x16 crop of a 32x32 image resized back to 32x32 (bilinear,
    # align_corners=False) spans exactly [left, left + 15] along x and is constant along y.
    ramp = torch.arange(32.0).expand(8, 3, 32, 32).clone()
    aug = ImageAugmentation(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0)
    out = aug(ramp, _gen(0))
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert torch.allclose(span, torch.full((8,), 15.0))
    assert torch.equal(out, out[:, :, :1, :].expand_as(out))
    assert (out[..., 1:] >= out[..., :-1]).all()
    lefts = out[:, 0, 0, 0]
    assert torch.equal(lefts, lefts.round()) and lefts.min() >= 0 and lefts.max() <= 16
    assert len(set(lefts.tolist())) > 1  # independent crops per sample


def test_image_crop_fallback_on_impossible_ratio() -> None:
    # A 3:1 aspect ratio never fits a full-area crop of a square image: centre crop with the ratio clipped.
    ramp = torch.arange(30.0).expand(2, 3, 30, 30).clone()
    aug = ImageAugmentation(crop_scale=(1.0, 1.0), crop_ratio=(3.0, 3.0), brightness=0, contrast=0, saturation=0)
    out = aug(ramp, _gen(0))
    assert torch.equal(out, out[:, :, :1, :].expand_as(out))  # crop spans all columns: each row is the ramp
    assert torch.allclose(out, ramp)


@settings(max_examples=30, deadline=None)
@given(
    ratio=st.floats(0.0, 1.0),
    batch=st.integers(1, 5),
    patch_size=st.sampled_from([4, 5, 8]),
    size=st.sampled_from([16, 20, 23]),
    seed=st.integers(0, 2**31 - 1),
    augment=st.booleans(),
)
def test_patch_masking_zeroes_exact_number_of_patches(
    ratio: float, batch: int, patch_size: int, size: int, seed: int, augment: bool
) -> None:
    images = _images(batch, size, seed=seed)
    settings_ = {} if augment else IDENTITY
    aug = ImageAugmentation(patch_mask_ratio=ratio, patch_size=patch_size, **settings_)
    out = aug(images, _gen(seed))
    grid = size // patch_size
    expected = round(ratio * grid * grid)
    patches = out[:, :, : grid * patch_size, : grid * patch_size].reshape(batch, 3, grid, patch_size, grid, patch_size)
    zero_patches = (patches == 0).all(dim=(1, 3, 5))  # (B, grid, grid)
    assert zero_patches.sum(dim=(1, 2)).tolist() == [expected] * batch
    assert (out != 0).sum() == out.numel() - expected * batch * 3 * patch_size**2  # nothing else is zero
    if not augment:
        pixel_mask = aug.patch_mask(batch, size, size, _gen(0))
        assert pixel_mask.shape == (batch, size, size)
        kept = out != 0
        assert torch.equal(out[kept], images[kept])


def test_patch_size_larger_than_image_rejected() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        ImageAugmentation(patch_mask_ratio=0.5, patch_size=64)(_images(2, 32))


def test_colour_jitter_stays_in_normalised_range() -> None:
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    images = (torch.rand(8, 3, 16, 16, generator=_gen(0)) - m) / s  # un-normalised [0, 1]
    aug = ImageAugmentation(brightness=0.9, contrast=0.9, saturation=0.9, image_mean=mean, image_std=std)
    out = aug(images, _gen(1))
    low, high = (0 - m) / s, (1 - m) / s
    tol = 1e-5
    assert (out >= low - tol).all() and (out <= high + tol).all()
    assert torch.isclose(out, low.expand_as(out), atol=tol).any()  # strong jitter saturates some pixels
    assert not torch.allclose(out, aug.__class__(**{**IDENTITY, "image_mean": mean, "image_std": std})(images))


def test_brightness_is_applied_in_unnormalised_space() -> None:
    # Un-normalised values in [0.1, 0.6) times a factor in [0.5, 1.5] never clip, so per sample
    # unnorm(out) / unnorm(in) is one constant factor (it would not be if applied to normalised values).
    mean, std = (0.2, 0.4, 0.6), (0.3, 0.2, 0.1)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    raw = 0.1 + 0.5 * torch.rand(6, 3, 8, 8, generator=_gen(0))
    aug = ImageAugmentation(**{**IDENTITY, "brightness": 0.5}, image_mean=mean, image_std=std)
    out = aug((raw - m) / s, _gen(3))
    factor = (out * s + m) / raw
    per_sample = factor.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-5)
    assert (per_sample[:, 0] >= 0.5 - 1e-5).all() and (per_sample[:, 0] <= 1.5 + 1e-5).all()
    assert per_sample[:, 0].std() > 0.01


def test_saturation_and_contrast_leave_a_grey_image_unchanged() -> None:
    images = torch.zeros(4, 3, 8, 8)  # un-normalised 0.5 everywhere with mean = std = 0.5
    out = ImageAugmentation(**{**IDENTITY, "contrast": 0.8, "saturation": 0.8})(images, _gen(0))
    assert torch.allclose(out, images, atol=1e-6)


def test_image_rejects_bad_inputs() -> None:
    aug = ImageAugmentation()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        aug(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        aug(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.8, 0.5)),
        ("crop_scale", (0.5, 1.5)),
        ("crop_ratio", (0.0, 1.0)),
        ("crop_ratio", (2.0, 1.0)),
        ("brightness", -0.1),
        ("contrast", float("nan")),
        ("saturation", -1.0),
        ("patch_mask_ratio", 1.5),
        ("patch_mask_ratio", -0.1),
        ("patch_size", 0),
        ("image_std", (0.5, 0.0, 0.5)),
        ("image_std", (0.5, 0.5)),
        ("image_mean", ()),
    ],
)
def test_image_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ImageAugmentation(**{field: value})


# ------------------------------------------------------------------------------------------------------ text
@pytest.mark.parametrize(("ids_dtype", "mask_dtype"), [(torch.long, torch.long), (torch.int32, torch.bool)])
def test_text_shape_dtype_and_inputs_unmodified(ids_dtype: torch.dtype, mask_dtype: torch.dtype) -> None:
    ids, mask = _texts([5, 10, 1, 0], 16)
    ids, mask = ids.to(ids_dtype), mask.to(mask_dtype)
    ids_before, mask_before = ids.clone(), mask.clone()
    new_ids, new_mask = TextAugmentation(mask_probability=0.5, drop_probability=0.5)(ids, mask, _gen(0))
    assert new_ids.shape == ids.shape and new_mask.shape == mask.shape
    assert new_ids.dtype == ids_dtype and new_mask.dtype == mask_dtype
    assert torch.equal(ids, ids_before) and torch.equal(mask, mask_before)
    assert not torch.equal(new_ids, ids)


def test_text_determinism() -> None:
    ids, mask = _texts([20] * 8, 24)
    aug = TextAugmentation(mask_probability=0.3, drop_probability=0.2)
    first, second = aug(ids, mask, _gen(5)), aug(ids, mask, _gen(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], aug(ids, mask, _gen(6))[0])


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 14), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    mask_probability=st.floats(0.0, 1.0),
    drop_probability=st.floats(0.0, 1.0),
)
def test_text_special_tokens_and_padding_never_touched(
    lengths: list[int], seed: int, mask_probability: float, drop_probability: float
) -> None:
    # Content ids in [0, 30) include special ids (and [UNK]) in the middle of rows, random padding lengths.
    ids, mask = _texts(lengths, 18, seed=seed, low=0)
    ids = torch.where(mask.bool(), ids, PAD)
    aug = TextAugmentation(mask_probability=mask_probability, drop_probability=drop_probability)
    new_ids, new_mask = aug(ids, mask, _gen(seed))
    content = aug.content_mask(ids, mask)
    for row in range(len(lengths)):
        old = ids[row][mask[row].bool()].tolist()
        new = new_ids[row][new_mask[row].bool()].tolist()
        n_valid = len(new)
        # attention_mask is a contiguous prefix; everything after it is padding.
        assert new_mask[row, :n_valid].eq(1).all() and new_mask[row, n_valid:].eq(0).all()
        assert new_ids[row, n_valid:].eq(PAD).all()
        assert n_valid <= len(old)
        # Special tokens are kept, in order, and never masked into something else.
        assert [t for t in new if t in SPECIAL and t != MASK] == [t for t in old if t in SPECIAL and t != MASK]
        assert sum(t == MASK for t in new) >= sum(t == MASK for t in old)
        assert new[0] == CLS and new[-1] == SEP
        # A row that had content tokens keeps at least one content position.
        kept_content = n_valid - sum(t in SPECIAL for t in old)
        assert kept_content >= (1 if content[row].any() else 0)
        if mask_probability == 0:
            assert _is_subsequence(new, old)


def test_text_masking_only_without_dropping() -> None:
    ids, mask = _texts([3, 12, 0, 7], 16, low=0)
    aug = TextAugmentation(mask_probability=0.6, drop_probability=0.0)
    new_ids, new_mask = aug(ids, mask, _gen(0))
    assert torch.equal(new_mask, mask)
    content = aug.content_mask(ids, mask)
    assert torch.equal(new_ids[~content], ids[~content])  # specials, padding untouched in place
    changed = new_ids != ids
    assert (new_ids[changed] == MASK).all()
    assert changed.any()


def test_text_masked_fraction_matches_probability() -> None:
    ids, mask = _texts([60] * 512, 62, low=5)
    new_ids, new_mask = TextAugmentation(mask_probability=0.15, drop_probability=0.0)(ids, mask, _gen(0))
    fraction = (new_ids[:, 1:61] == MASK).float().mean().item()
    assert abs(fraction - 0.15) < 0.01
    assert torch.equal(new_ids[:, 0], ids[:, 0]) and torch.equal(new_ids[:, 61], ids[:, 61])


def test_text_dropped_fraction_matches_probability() -> None:
    ids, mask = _texts([60] * 512, 62, low=5)
    _, new_mask = TextAugmentation(mask_probability=0.0, drop_probability=0.1)(ids, mask, _gen(0))
    dropped = 1 - (new_mask.sum() - 2 * 512).item() / (60 * 512)
    assert abs(dropped - 0.1) < 0.01


def test_text_dropping_keeps_order_and_shifts_left() -> None:
    lengths = [10, 4, 1, 0, 15]
    ids, mask = _texts(lengths, 20, low=5)
    ids[:, 1:16] = torch.arange(10, 25).expand(5, 15) * mask[:, 1:16]  # increasing content ids
    ids = torch.where(mask.bool() & (torch.arange(20) == torch.tensor(lengths).unsqueeze(1) + 1), SEP, ids)
    new_ids, new_mask = TextAugmentation(mask_probability=0.0, drop_probability=0.5)(ids, mask, _gen(2))
    assert (new_mask.sum(dim=1) <= mask.sum(dim=1)).all()
    assert (new_mask.sum(dim=1) < mask.sum(dim=1)).any()
    for row in range(len(lengths)):
        n = int(new_mask[row].sum())
        assert new_mask[row, :n].eq(1).all() and new_mask[row, n:].eq(0).all()
        kept = new_ids[row, :n].tolist()
        assert kept[0] == CLS and kept[-1] == SEP
        middle = kept[1:-1]
        assert middle == sorted(middle) and len(set(middle)) == len(middle)  # order kept
        assert set(middle) <= set(ids[row, 1 : lengths[row] + 1].tolist())
        assert len(middle) >= min(1, lengths[row])
        assert new_ids[row, n:].eq(PAD).all()


def test_text_rows_never_lose_all_content() -> None:
    ids, mask = _texts([1, 2, 5, 0], 8)
    new_ids, new_mask = TextAugmentation(mask_probability=0.0, drop_probability=1.0)(ids, mask, _gen(0))
    assert torch.equal(new_ids, ids) and torch.equal(new_mask, mask)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mask_probability", 1.5),
        ("mask_probability", -0.01),
        ("drop_probability", 2.0),
        ("mask_token_id", -1),
        ("pad_token_id", 1.5),
        ("special_token_ids", (0, -2)),
    ],
)
def test_text_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TextAugmentation(**{field: value})


def test_text_rejects_bad_inputs() -> None:
    aug = TextAugmentation()
    ids, mask = _texts([3], 8)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        aug(ids[0], mask[0])
    with pytest.raises(ValueError, match="shape"):
        aug(ids, mask[:, :4])
    with pytest.raises(TypeError, match="integer"):
        aug(ids.float(), mask)


# ----------------------------------------------------------------------------------------------------- views
def test_make_views_keys_shapes_and_difference() -> None:
    images = _images(4, 32)
    ids, mask = _texts([20, 15, 10, 5], 24)
    before = (images.clone(), ids.clone(), mask.clone())
    views = make_views(images, ids, mask, ImageAugmentation(), TextAugmentation(mask_probability=0.3), _gen(0))
    assert set(views) == {
        "pixel_values",
        "input_ids",
        "attention_mask",
        "second_view_pixel_values",
        "second_view_input_ids",
        "second_view_attention_mask",
    }
    for prefix in ("", "second_view_"):
        assert views[f"{prefix}pixel_values"].shape == images.shape
        assert views[f"{prefix}input_ids"].shape == ids.shape
        assert views[f"{prefix}attention_mask"].shape == mask.shape
    assert not torch.allclose(views["pixel_values"], views["second_view_pixel_values"])
    assert not torch.equal(views["input_ids"], views["second_view_input_ids"])
    assert torch.equal(images, before[0]) and torch.equal(ids, before[1]) and torch.equal(mask, before[2])
    again = make_views(images, ids, mask, ImageAugmentation(), TextAugmentation(mask_probability=0.3), _gen(0))
    assert all(torch.equal(views[key], again[key]) for key in views)


def test_make_views_without_augmentation_copies_inputs() -> None:
    images = _images(2, 16)
    ids, mask = _texts([5, 3], 10)
    views = make_views(images, ids, mask, None, TextAugmentation(), _gen(0))
    assert torch.equal(views["pixel_values"], images) and torch.equal(views["second_view_pixel_values"], images)
    assert views["pixel_values"].data_ptr() != images.data_ptr()
    views = make_views(images, ids, mask, ImageAugmentation(), None, _gen(0))
    assert torch.equal(views["input_ids"], ids) and torch.equal(views["second_view_attention_mask"], mask)
    assert not torch.allclose(views["pixel_values"], views["second_view_pixel_values"])
