"""The objectives' loss functions (contrastive NT-Xent / InfoNCE, K explicit negatives, SigLIP, masked text and
image modelling, VQA, captioning) and the masking helpers they use. Pure functions of tensors: the training code
gathers across processes (`xmodal.training.losses`), these never call `torch.distributed`.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from xmodal.checks import _check_ranges, _Range

_LOSS_CHUNK_ELEMENTS = 1 << 20
"""Rows of a `B x B` logits matrix are processed in chunks of about this many elements (4 MiB in fp32)."""


def _row_slices(size: int) -> list[slice]:
    """Slices of the rows of a `(size, size)` matrix, each about `_LOSS_CHUNK_ELEMENTS` elements."""
    step = max(1, _LOSS_CHUNK_ELEMENTS // size)
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


class _SymmetricInfoNCE(torch.autograd.Function):
    """The symmetric InfoNCE loss of a square logits matrix X `(B, B)`, fused: the forward keeps only the row and
    column log-sum-exps `(B,)` besides X, and the backward writes dL/dX = (softmax_rows(X) + softmax_columns(X)
    - 2 Q) / 2B (Q the smoothed one-hot targets) into one new `(B, B)` matrix. Temporaries are row chunks, so the
    peak is X and its gradient, where two cross-entropies keep four `B x B` matrices (two log-softmax outputs and
    two gradients). Computed in fp32 at least: fp16/bf16 logits give an fp32 loss, as autocast's cross-entropy does,
    and a gradient in their own dtype."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        size, dtype = logits.shape[0], torch.promote_types(logits.dtype, torch.float32)
        x = logits.to(dtype)
        row_lse = torch.empty(size, dtype=dtype, device=logits.device)
        column_lse = torch.full((size,), float("-inf"), dtype=dtype, device=logits.device)
        for rows in _row_slices(size):
            row_lse[rows] = torch.logsumexp(x[rows], dim=1)
            column_lse = torch.logaddexp(column_lse, torch.logsumexp(x[rows], dim=0))
        diagonal_mean = x.diagonal().mean()
        # CE with smoothing e: (1 - e)(lse_i - x_ii) + e (lse_i - mean_j x_ij), averaged over i, for rows and columns
        loss = (row_lse.mean() + column_lse.mean()) / 2 - (1 - label_smoothing) * diagonal_mean
        if label_smoothing:
            loss = loss - label_smoothing * x.mean()
        ctx.save_for_backward(logits, row_lse, column_lse)
        ctx.label_smoothing = label_smoothing
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, row_lse, column_lse = ctx.saved_tensors
        size, smoothing, dtype = logits.shape[0], ctx.label_smoothing, row_lse.dtype
        grad = torch.empty(logits.shape, dtype=dtype, device=logits.device)
        for rows in _row_slices(size):
            chunk = logits[rows].to(dtype)
            torch.sub(chunk, row_lse[rows, None], out=grad[rows]).exp_()
            grad[rows].add_(chunk.sub(column_lse[None, :]).exp_())
        if smoothing:
            grad.sub_(2 * smoothing / size)
        grad.diagonal().sub_(2 * (1 - smoothing))
        grad.mul_(grad_output.to(dtype) / (2 * size))
        return grad.to(logits.dtype), None


def contrastive_loss(logits_per_text: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    r"""Symmetric InfoNCE / NT-Xent loss (CLIP; Chen et al. 2020) over a square similarity matrix.

    For pairs (i, i), L = 1/2 [ -1/N sum_i log softmax_j(s_ij / t) - 1/N sum_i log softmax_j(s_ji / t) ],
    where `logits_per_text` already holds s_ij / t. Equal to the mean of two `F.cross_entropy` calls (rows and
    columns) with the same label smoothing, but fused: its memory peak is the logits matrix and its gradient.

    Args:
        logits_per_text (`torch.Tensor` of shape `(batch_size, batch_size)`): text rows, image columns.
        label_smoothing (`float`): label smoothing of both cross-entropies.
    """
    if logits_per_text.ndim != 2 or logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise ValueError(f"contrastive_loss needs a square logits matrix, got shape {tuple(logits_per_text.shape)}.")
    return _SymmetricInfoNCE.apply(logits_per_text, float(label_smoothing))


def negatives_contrastive_loss(
    positive_logits: torch.Tensor, negative_logits: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    r"""The explicit-negatives contrastive loss with K negatives per positive (MoCo; the seed article's CIM loss):

    L = -1/N sum_i log( e^{s_pos,i / t} / (e^{s_pos,i / t} + sum_k e^{s_neg,ik / t}) ).

    Args:
        positive_logits (`torch.Tensor` of shape `(batch_size,)`): s_pos / t.
        negative_logits (`torch.Tensor` of shape `(batch_size, num_negatives)`): s_neg / t.
    """
    logits = torch.cat([positive_logits[:, None], negative_logits], dim=1)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def contrastive_loss_with_negative_texts(
    logits_per_text: torch.Tensor, negative_logits_per_image: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    r"""Symmetric InfoNCE with K extra negative texts that match no image (NegCLIP, Yuksekgonul et al. 2023): they
    join the image->text softmax only,

    L = 1/2 [ -1/N sum_i log( e^{s_ii / t} / (sum_j e^{s_ij / t} + sum_k e^{n_ik / t}) )
              - 1/N sum_i log softmax_j(s_ji / t) ],

    s_ij being image i against text j and n_ik image i against negative text k.

    Args:
        logits_per_text (`torch.Tensor` of shape `(batch_size, batch_size)`): s / t, text rows, image columns.
        negative_logits_per_image (`torch.Tensor` of shape `(batch_size, num_negatives)`): n / t, each image against
            each negative text.
        label_smoothing (`float`): label smoothing of both cross-entropies.
    """
    if negative_logits_per_image.ndim != 2 or negative_logits_per_image.shape[0] != logits_per_text.shape[1]:
        raise ValueError(
            f"negative_logits_per_image must be (num_images, num_negatives) = ({logits_per_text.shape[1]}, K), got "
            f"shape {tuple(negative_logits_per_image.shape)}."
        )
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    per_image = torch.cat([logits_per_text.t(), negative_logits_per_image], dim=1)
    return (
        F.cross_entropy(per_image, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    ) / 2.0


def siglip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    r"""Pairwise sigmoid loss (SigLIP, Zhai et al. 2023): L = -1/N sum_ij log sigmoid(z_ij (t x_i.y_j + b)), with
    z_ij = 1 for matching pairs and -1 otherwise.

    Args:
        logits_per_text (`torch.Tensor` of shape `(batch_size, batch_size)`): t x_i.y_j + b, pairs on the diagonal.
    """
    batch_size = logits_per_text.shape[0]
    signs = 2.0 * torch.eye(batch_size, device=logits_per_text.device, dtype=logits_per_text.dtype) - 1.0
    return -F.logsigmoid(signs * logits_per_text).sum() / batch_size


def nt_xent_loss(
    first_view: torch.Tensor, second_view: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    r"""NT-Xent between two views of the same items (SimCLR, Chen et al. 2020; the seed article's form):

    L = -1/2N sum_i log( e^{s_i,p(i) / t} / sum_{k != i} e^{s_ik / t} ) over the 2N embeddings, p(i) being the other
    view of item i.

    Args:
        first_view, second_view (`torch.Tensor` of shape `(batch_size, dim)`): embeddings (normalised here).
        logit_scale: 1 / t (a tensor or a float).
    """
    batch_size = first_view.shape[0]
    embeddings = F.normalize(torch.cat([first_view, second_view]), dim=-1)
    logits = logit_scale * embeddings @ embeddings.t()  # (2N, 2N)
    self_mask = torch.eye(2 * batch_size, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, torch.finfo(logits.dtype).min)
    index = torch.arange(batch_size, device=logits.device)
    labels = torch.cat([index + batch_size, index])
    return F.cross_entropy(logits, labels)


def masked_language_modeling_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the positions whose label is not -100 (0 with a gradient when there are none):
    `logits` `(..., V)`, `labels` `(...)`."""
    # the sum over the counted positions, not the mean: no host read to find out whether there are any
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (labels != -100).sum().clamp(min=1)


def _vqa_label_ranges(labels: torch.Tensor, num_answers: int) -> list[_Range]:
    """The bound of `(B,)` answer indices (none for soft scores), for `_check_ranges`."""
    if labels.ndim != 1 or labels.dtype.is_floating_point or not labels.numel():
        return []
    return [_Range("VQA answer indices", labels, num_answers, f"num_answers={num_answers}", "the VQA head")]


def vqa_loss(logits: torch.Tensor, labels: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """VQA-v2 soft-score loss: binary cross-entropy against the answer scores, times the number of answers (ViLT,
    Anderson et al. 2018). `logits` `(B, A)`; `labels` `(B, A)` scores in [0, 1] or `(B,)` answer indices (checked
    to lie in [0, A) unless `check_values=False`, for a caller that checked them already)."""
    if labels.ndim == 1:
        if labels.dtype.is_floating_point:
            raise TypeError(
                "1-D VQA labels must be integer answer indices; soft scores have shape (batch, num_answers)."
            )
        if check_values:
            _check_ranges(_vqa_label_ranges(labels, logits.shape[-1]))
        labels = F.one_hot(labels, logits.shape[-1])
    if labels.shape != logits.shape:
        raise ValueError(f"VQA labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape)}.")
    labels = labels.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, labels) * labels.shape[-1]


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each token not flagged in `special_tokens_mask` is chosen with `probability`; a chosen token
    becomes [MASK] with probability 0.8, a uniformly random token with 0.1, and stays unchanged with 0.1.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
        special_tokens_mask (`torch.BoolTensor` of the same shape): True for special and padding tokens.

    Returns:
        `(masked_input_ids, labels)`; `labels` holds the original id at chosen positions and -100 elsewhere.
    """
    device = input_ids.device
    chosen = torch.rand(input_ids.shape, generator=generator, device=device) < probability
    chosen &= ~special_tokens_mask.bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = chosen & (draw < 0.8)
    to_random = chosen & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device, dtype=input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    return torch.where(to_random, random_ids, masked), labels


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A `(batch_size, num_patches)` boolean mask with exactly max(1, round(mask_ratio * num_patches)) True entries
    per row, chosen uniformly (MAE's random masking)."""
    num_masked = min(num_patches, max(1, round(mask_ratio * num_patches)))
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, H/P * W/P, P * P * C)`, patches in the row-major order of the patch embedding (MAE)."""
    batch_size, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch_size, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch_size, grid_h * grid_w, patch_size * patch_size * channels)


def masked_image_modeling_loss(
    predictions: torch.Tensor,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    patch_size: int,
    norm_pix: bool,
) -> torch.Tensor:
    """Mean squared error on the masked patches only (MAE, He et al. 2022), against per-patch normalised pixels when
    `norm_pix`. `predictions` `(B, N, P*P*C)`, `pixel_values` `(B, C, H, W)`, `bool_masked_pos` `(B, N)`."""
    target = patchify(pixel_values, patch_size).to(predictions.dtype)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6).sqrt()
    per_patch = (predictions - target).pow(2).mean(dim=-1)
    weights = bool_masked_pos.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t + 1 (labels are the input ids, -100 ignored).
    `logits` `(B, L, V)`, `labels` `(B, L)`."""
    return masked_language_modeling_loss(logits[:, :-1], labels[:, 1:])


__all__ = [
    "causal_lm_loss",
    "contrastive_loss",
    "contrastive_loss_with_negative_texts",
    "mask_tokens",
    "masked_image_modeling_loss",
    "masked_language_modeling_loss",
    "negatives_contrastive_loss",
    "nt_xent_loss",
    "patchify",
    "random_patch_mask",
    "siglip_loss",
    "vqa_loss",
]
