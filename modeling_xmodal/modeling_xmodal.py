"""PyTorch xmodal: a ViT image encoder, a BERT-style text encoder, a cross-attention fusion module and a
contrastive projection, with transformers' attention interface, gradient checkpointing and safetensors weights.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPooling,
    CausalLMOutputWithCrossAttentions,
    ImageClassifierOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple, logging

from xmodal.configuration.configuration_xmodal import (
    XModalConfig,
    XModalCrossConfig,
    XModalDecoderConfig,
    XModalTextConfig,
    XModalVisionConfig,
)

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Input checks at the model boundary: shapes and dtypes, plus one device sync for the range of the token ids
# --------------------------------------------------------------------------------------------------------------


def _check_pixel_values(pixel_values: object, num_channels: int | None) -> None:
    """Raise a `TypeError`/`ValueError` naming the problem unless `pixel_values` is a non-empty floating-point tensor
    of shape `(batch_size, num_channels, height, width)`. Values are not inspected (no device sync)."""
    if pixel_values is None:
        raise ValueError("pixel_values is required (a float tensor of shape (batch_size, 3, height, width)).")
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor of shape (batch_size, num_channels, height, width), got a "
            f"{type(pixel_values).__name__}; convert images with the processor (return_tensors='pt')."
        )
    channels = num_channels if num_channels is not None else "num_channels"
    if pixel_values.ndim != 4 or (num_channels is not None and pixel_values.shape[1] != num_channels):
        hint = ""
        if pixel_values.ndim == 4 and pixel_values.shape[-1] == num_channels:
            hint = " It looks channels-last: use pixel_values.permute(0, 3, 1, 2)."
        elif pixel_values.ndim == 3:
            hint = " A single image needs a batch dimension: use pixel_values[None]."
        raise ValueError(
            f"pixel_values must have shape (batch_size, {channels}, height, width), got "
            f"{tuple(pixel_values.shape)}.{hint}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point tensor of normalised pixels, got dtype {pixel_values.dtype}: "
            "raw integer or boolean pixels must go through the image processor first."
        )
    if 0 in pixel_values.shape:
        raise ValueError(
            f"pixel_values is empty (shape {tuple(pixel_values.shape)}): a batch needs at least one image of at least "
            "one pixel."
        )


def _check_text_inputs(
    config: PreTrainedConfig,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    check_values: bool = True,
) -> None:
    """Raise a `TypeError`/`ValueError` naming the problem for text inputs the text tower (`config`, any model type)
    cannot take: non-tensors, wrong ranks or dtypes, an empty batch or sequence, a mask or ids of another shape than
    `input_ids` `(batch_size, sequence_length)`, a sequence longer than `max_position_embeddings`, and, with
    `check_values`, ids outside the embedding tables (`_check_ranges`: one device sync for all id tensors)."""
    named = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "position_ids": position_ids,
    }
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got a {type(value).__name__}; tokenize with the processor "
                "(return_tensors='pt')."
            )
    for name in ("input_ids", "token_type_ids", "position_ids"):
        value = named[name]
        if value is not None and value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an integer tensor (int64 or int32), got dtype {value.dtype}.")
    reference = input_ids if input_ids is not None else inputs_embeds
    expected_rank = 2 if input_ids is not None else 3
    if reference.ndim != expected_rank:
        shape = (
            "(batch_size, sequence_length)" if input_ids is not None else "(batch_size, sequence_length, hidden_size)"
        )
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(reference.shape)}.")
    batch_size, length = reference.shape[:2]
    if batch_size == 0 or length == 0:
        raise ValueError(
            f"{'input_ids' if input_ids is not None else 'inputs_embeds'} is empty (shape {tuple(reference.shape)}): "
            "a batch needs at least one text of at least one token."
        )
    for name in ("attention_mask", "token_type_ids"):
        value = named[name]
        if value is not None and tuple(value.shape) != (batch_size, length):
            raise ValueError(
                f"{name} must have the shape of the tokens ({batch_size}, {length}), got {tuple(value.shape)}."
            )
    if position_ids is not None and (
        position_ids.ndim != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch_size)
    ):
        raise ValueError(
            f"position_ids must have shape ({batch_size}, {length}) or (1, {length}), got {tuple(position_ids.shape)}."
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and length > max_positions:
        raise ValueError(
            f"Sequence length {length} exceeds max_position_embeddings={max_positions}; truncate the text "
            "(processor(..., truncation=True, max_length=...))."
        )
    if check_values:
        _check_ranges(_text_id_ranges(config, input_ids, token_type_ids, position_ids))


@dataclass
class _Range:
    """The values of `tensor` must lie in [0, `size`): `accepted_by` names who needs that and `what` the limit in the
    error, `hint` says how to fix it."""

    name: str
    tensor: torch.Tensor
    size: int
    what: str
    accepted_by: str = "the text tower"
    hint: str = ""


def _text_id_ranges(
    config: PreTrainedConfig,
    input_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    accepted_by: str = "the text tower",
    prefix: str = "",
) -> list[_Range]:
    """The embedding-table bounds of a text tower's (or decoder's) id tensors, for `_check_ranges`."""
    type_vocab_size = getattr(config, "type_vocab_size", None)
    tables = [
        ("input_ids", input_ids, getattr(config, "vocab_size", None), "vocab_size"),
        ("token_type_ids", token_type_ids, type_vocab_size or None, "type_vocab_size"),  # 0: no token types, ignored
        ("position_ids", position_ids, getattr(config, "max_position_embeddings", None), "max_position_embeddings"),
    ]
    hint = (
        f" The tokenizer does not match the model: its vocabulary must fit {accepted_by}'s vocab_size (after adding "
        "tokens, call model.resize_token_embeddings(len(tokenizer)))."
    )
    return [
        _Range(prefix + name, ids, size, f"{field}={size}", accepted_by, hint if name == "input_ids" else "")
        for name, ids, size, field in tables
        if ids is not None and isinstance(size, int) and ids.numel()
    ]


def _check_ranges(ranges: list[_Range]) -> None:
    """Raise a `ValueError` naming the first tensor with a value outside its [0, size). Reading values on the host
    waits for an accelerator to finish its queued work, so all tensors are read in one device synchronisation;
    nothing is read under `torch.compile` (a branch on values would break the graph; the eager call at the model
    boundary checks them)."""
    if not ranges or torch.compiler.is_compiling():
        return
    device = ranges[0].tensor.device
    extremes = [torch.stack([check.tensor.min(), check.tensor.max()]).long().to(device) for check in ranges]
    bounds = torch.stack(extremes).tolist()  # the one device sync
    for check, (low, high) in zip(ranges, bounds, strict=True):
        if low < 0 or high >= check.size:
            raise ValueError(
                f"{check.name} hold ids from {low} to {high} (max id {high}); {check.accepted_by} accepts "
                f"[0, {check.size}) ({check.what}).{check.hint}"
            )


def _host_reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading `tensor`'s values on the host costs nothing: a CPU tensor in eager mode. On an accelerator
    a read (`bool(t.all())`, `int(t.max())`) waits for every queued kernel, so optional fast paths that need one
    (skipping an all-ones mask) are only taken on CPU."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------------------
# Loading policy of `XModalPreTrainedModel.from_pretrained`: safetensors only by default, clear errors for damaged or
# mismatching weights
# --------------------------------------------------------------------------------------------------------------

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Weights under these prefixes are the pretrained towers: loading without them would give a model that is silently
# random where it matters, so their absence is an error (new heads and fusion modules may be initialised).
_REQUIRED_PREFIXES = ("vision_model", "text_model")


def _pickle_refusal(where: str, files: list[str]) -> str:
    return (
        f"{where} has no safetensors weights, only pickle-based files ({', '.join(files)}). xmodal loads safetensors "
        "only by default, because unpickling a file can execute arbitrary code. If you trust the files, pass "
        "use_safetensors=False: pytorch_model.bin is then read with torch.load(weights_only=True), which accepts "
        "tensors only. Better, convert the weights once: safetensors.torch.save_file(torch.load(path, "
        "weights_only=True), 'model.safetensors', metadata={'format': 'pt'})."
    )


def _refuse_pickle_only(path: str, subfolder: str) -> None:
    """Raise `OSError` if the local `path` is a pickle file, or a folder with pickle-based weights and no
    safetensors ones (a Hub id is checked by transformers, which is asked for safetensors only)."""
    if os.path.isfile(path) or os.path.isfile(os.path.join(subfolder, path)):
        if not path.endswith(".safetensors"):
            raise OSError(_pickle_refusal(f"The weights file {path!r}", [os.path.basename(path)]))
        return
    folder = os.path.join(path, subfolder)
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    if any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names):
        return
    pickled = sorted(name for name in names if name.endswith(_PICKLE_SUFFIXES) or name.endswith(".bin.index.json"))
    if pickled:
        raise OSError(_pickle_refusal(f"The folder {folder!r}", pickled))


def _damaged_weights_file(path: str | None, subfolder: str) -> str:
    """The local safetensors file that cannot be opened (after a `SafetensorError`), or a description of it."""
    if path is None:
        return "the weights file"
    if os.path.isfile(path):
        return repr(path)
    folder = os.path.join(path, subfolder)
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(folder, name), framework="pt"):
                        pass
                except SafetensorError:
                    return repr(os.path.join(folder, name))
    return f"the safetensors weights of {path!r}"


def _weights_source(path: str | None, subfolder: str, use_safetensors: bool) -> str:
    """How to name the weights that were loaded in an error: the local file transformers reads, else the repo."""
    if path is None:
        return "the given state_dict"
    if os.path.isfile(path):
        return repr(path)
    folder = os.path.join(path, subfolder)
    safe = ("model.safetensors", "model.safetensors.index.json")
    pickled = ("pytorch_model.bin", "pytorch_model.bin.index.json")
    for name in safe + pickled if use_safetensors else pickled + safe:
        if os.path.isfile(os.path.join(folder, name)):
            return repr(os.path.join(folder, name))
    return f"the weights of {path!r}"


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class XModalOutput(ModelOutput):
    r"""Output of [`XModalModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            symmetric InfoNCE / NT-Xent loss of the image-text similarities.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            scaled cosine similarities, image rows against text columns.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`): L2-normalised.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`): L2-normalised.
        text_model_output, vision_model_output (`BaseModelOutputWithPooling`): the tower outputs; their
            `pooler_output` is the projected (unnormalised) embedding.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ("text_model_output", "vision_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


@dataclass
class XModalFusionOutput(ModelOutput):
    r"""Output of the cross-modal fusion module.

    Args:
        pooler_output (`torch.FloatTensor` of shape `(batch_size, cross_hidden_size)`): the fused representation
            of each image-text pair: the fused text [CLS] (`text_to_image`), the fused image [CLS]
            (`image_to_text`) or their element-wise product (`both`, as in ViLBERT).
        text_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, text_length, cross_hidden_size)`):
            text tokens after fusion (the projected tower output when text provides no queries).
        image_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_patches + 1, cross_hidden_size)`):
            image tokens after fusion (the projected tower output when the image provides no queries; None then if
            the pairs were given by `image_index`, rather than copying each image once per pair).
    """

    pooler_output: torch.FloatTensor | None = None
    text_last_hidden_state: torch.FloatTensor | None = None
    image_last_hidden_state: torch.FloatTensor | None = None


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scaling + mask) V. Shapes: q `(B, H, Lq, D)`, k/v `(B, H, Lk, D)`, mask `(B, 1, 1|Lq, Lk)`;
    returns `(B, Lq, H, D)` and the attention weights `(B, H, Lq, Lk)`."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:
        # no mask on a causal module means an unpadded prefill without cache (see `_causal_mask`)
        future = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).triu(1)
        attn_weights = attn_weights.masked_fill(future, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _additive_padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`(B, L)` 1/0 key-padding mask -> additive `(B, 1, 1, L)` mask, or None when nothing is padded (so sdpa can
    take its unmasked fast path). Whether anything is padded is only looked at on CPU (`_host_reads_are_free`):
    compiled or on an accelerator the mask is always built, so nothing waits for the device."""
    if attention_mask is None or (_host_reads_are_free(attention_mask) and bool(attention_mask.all())):
        return None
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    mask = mask.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return mask[:, None, None, :]


@dataclass
class _TokenPacking:
    """Where the real tokens of a right- or left-padded `(B, L)` batch lie, so that the token-wise work of a layer
    (LayerNorm, projections, MLP) runs on the `N` real tokens alone, as in unpadded BERT training (Portes et al.
    2023, MosaicBERT); only the attention core sees the padded `(B, L)` layout. Skipped tokens are padding, which
    the key mask hides from every real token, so the real tokens' outputs do not change."""

    index: torch.Tensor  # (N,) positions of the real tokens in the flattened (B * L) layout
    batch_size: int
    length: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> _TokenPacking:
        """From a `(B, L)` 1/0 mask with some padding."""
        batch_size, length = attention_mask.shape
        return cls(attention_mask.reshape(-1).nonzero().squeeze(1), batch_size, length)

    def unpad(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(B, L, C)` -> `(N, C)`."""
        return tokens.reshape(self.batch_size * self.length, -1).index_select(0, self.index)

    def pad(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(N, C)` -> `(B, L, C)`, zeros at the padding."""
        padded = tokens.new_zeros(self.batch_size * self.length, tokens.shape[-1]).index_copy(0, self.index, tokens)
        return padded.view(self.batch_size, self.length, -1)

    def sequence_index(self) -> torch.Tensor:
        """`(N,)` the row (sequence) of the batch each real token belongs to."""
        return torch.div(self.index, self.length, rounding_mode="floor")


def _visible_first(bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """`(B, N)` mask -> `(B, N)` patch indices, each row's unmasked patches first, in their original order."""
    return torch.argsort(bool_masked_pos.to(torch.uint8), dim=1, stable=True)


def _keep_visible(tokens: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """`(B, N, D)` tokens and a `(B, N)` mask with the same number of True entries per row -> the unmasked tokens
    `(B, N - num_masked, D)`, in their original order. The number kept (a shape) is the one host read; the tokens
    are gathered by index (no boolean indexing, whose forward and backward each read the mask on the host)."""
    if bool_masked_pos.shape != tokens.shape[:2]:
        raise ValueError(
            f"bool_masked_pos must have shape (batch_size, num_patches)={tuple(tokens.shape[:2])}, got "
            f"{tuple(bool_masked_pos.shape)}."
        )
    counts = (~bool_masked_pos.bool()).sum(dim=1)
    fewest, most = torch.stack([counts.min(), counts.max()]).tolist()
    if fewest != most:
        raise ValueError(
            f"bool_masked_pos must mask the same number of patches in every image (got {fewest} to {most} visible); "
            "use xmodal.random_patch_mask."
        )
    index = _visible_first(bool_masked_pos)[:, :fewest]  # (B, num_visible)
    return tokens.gather(1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))


def _restore_visible(visible: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """The inverse of `_keep_visible`: `(B, num_visible, D)` tokens and the `(B, N)` mask -> `(B, N, D)` with each
    token back in its place and zeros at the masked positions (scattered by index, no host read)."""
    batch_size, num_patches = bool_masked_pos.shape
    index = _visible_first(bool_masked_pos)[:, : visible.shape[1], None].expand(-1, -1, visible.shape[-1])
    return visible.new_zeros(batch_size, num_patches, visible.shape[-1]).scatter(1, index, visible)


def _causal_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Additive `(B, 1, Lq, past + Lq)` mask for causal self-attention over a cache of `past_length` tokens, or None
    where the attention modules' own causal flag suffices (nothing padded, and no cache or one query). Off CPU any
    given mask counts as padded (no host read, see `_additive_padding_mask`)."""
    padded = attention_mask is not None and not (_host_reads_are_free(attention_mask) and bool(attention_mask.all()))
    if not padded and (past_length == 0 or query_length == 1):
        return None
    key_length = past_length + query_length
    positions = torch.arange(key_length, device=device)
    future = positions[None, :] > (positions[past_length:, None])  # (Lq, Lk)
    blocked = future[None, None]
    if padded:
        blocked = blocked | (attention_mask[:, None, None, -key_length:] == 0)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


class XModalAttention(nn.Module):
    """Multi-head attention through transformers' attention interface (sdpa by default, eager available).

    Self-attention uses one fused QKV projection; cross-attention (`is_cross_attention=True`) projects the
    queries from `hidden_states` and the keys/values from `encoder_hidden_states`. Causal self-attention
    (`is_causal=True`, the captioning decoder) appends its keys/values to a transformers `Cache` when one is given.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        is_cross_attention: bool = False,
        is_causal: bool = False,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        if is_cross_attention:
            self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
            self.kv_proj = nn.Linear(self.embed_dim, 2 * self.embed_dim)
        else:
            self.qkv_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        encoder_index: torch.Tensor | None = None,
        packing: _TokenPacking | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(B, Lq, C)`, `encoder_hidden_states` `(B, Lk, C)` (or `(M, Lk, C)` with `encoder_index`
        `(B,)` picking row `encoder_index[b]` for query row b: each context is projected once however often it is
        used), additive `attention_mask` `(B, 1, 1 | Lq, Lk)` -> `(B, Lq, C)`. With `packing` (self-attention),
        `hidden_states` are the `(N, C)` real tokens of a padded batch and so is the output."""
        if packing is not None:  # uncached self-attention (the text tower)
            qkv = packing.pad(self.qkv_proj(hidden_states))  # (N, 3C) -> (B, L, 3C), the projection on real tokens
            batch_size, query_length = packing.batch_size, packing.length
            query, key, value = qkv.view(batch_size, query_length, 3, self.num_heads, self.head_dim).unbind(dim=2)
            return self.out_proj(packing.unpad(self._attend(query, key, value, attention_mask)))
        batch_size, query_length, _ = hidden_states.shape
        if self.is_cross_attention:
            query = self.q_proj(hidden_states).view(batch_size, query_length, self.num_heads, self.head_dim)
            key_length = encoder_hidden_states.shape[1]
            kv = self.kv_proj(encoder_hidden_states)
            if encoder_index is not None:
                kv = kv[encoder_index]
            kv = kv.view(batch_size, key_length, 2, self.num_heads, self.head_dim)
            key, value = kv.unbind(dim=2)
        else:
            qkv = self.qkv_proj(hidden_states).view(batch_size, query_length, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.unbind(dim=2)
        return self.out_proj(self._attend(query, key, value, attention_mask, cache))

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Per-head `query` `(B, Lq, H, D)`, `key`/`value` `(B, Lk, H, D)` -> attention output `(B, Lq, C)`, before
        the output projection."""
        batch_size, query_length = query.shape[:2]
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, L, D)
        if cache is not None and not self.is_cross_attention:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
        )
        return attn_output.reshape(batch_size, query_length, self.embed_dim)


class XModalMLP(nn.Module):
    """Two-layer feed-forward block: `(B, L, C)` -> `(B, L, C)`."""

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


def _drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """The stochastic depth rate of each of `depth` blocks, rising linearly from 0 at the first to `drop_path_rate`
    at the last (timm's `torch.linspace(0, drop_path_rate, depth)`, in float64 so that a rate just below 1 stays
    below 1)."""
    return [rate.item() for rate in torch.linspace(0.0, float(drop_path_rate), depth, dtype=torch.float64)]


class XModalDropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) of a residual branch, as timm's `DropPath`: in training, each sample's
    branch output is zeroed with probability `drop_prob` and the kept ones are scaled by `1 / (1 - drop_prob)`, so
    the expected output is the input; the identity in eval mode or at `drop_prob=0` (no random numbers drawn).

    The per-sample mask is drawn from the global torch RNG on the tensor's device: `(B, 1, ..., 1)` for `(B, ...)`.
    With `packing`, the input is the `(N, C)` real tokens of a padded batch of B sequences: the `(B,)` mask is
    drawn as for the padded `(B, L, C)` layout (the same random numbers) and expanded to each token's sequence.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"XModalDropPath.drop_prob must be in [0, 1), got {drop_prob!r}.")
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor, packing: _TokenPacking | None = None) -> torch.Tensor:
        """`hidden_states` `(B, ...)`, or `(N, C)` with `packing` -> the same shape."""
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        batch_size = packing.batch_size if packing is not None else hidden_states.shape[0]
        mask = hidden_states.new_empty(batch_size).bernoulli_(keep_prob).div_(keep_prob)  # (B,)
        if packing is not None:
            mask = mask.index_select(0, packing.sequence_index())  # (N,)
        return hidden_states * mask.view(-1, *([1] * (hidden_states.ndim - 1)))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class XModalEncoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + SelfAttn(LN(x)) [+ CrossAttn(LN(x), LN(context))] + MLP(LN(x)).

    With `has_cross_attention=True` it is a fusion layer: the queries come from `hidden_states` and the
    keys/values from `encoder_hidden_states` (the other modality), as in ALBEF/BLIP. With `is_causal=True` the
    self-attention is causal and cached (a decoder layer). With `drop_path_rate > 0`, each residual branch goes
    through [`XModalDropPath`] after its dropout (stochastic depth; drawn independently per branch, as in timm);
    at 0 there is no such module.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        has_cross_attention: bool = False,
        is_causal: bool = False,
        layer_idx: int | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = XModalAttention(config, is_causal=is_causal, layer_idx=layer_idx)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.cross_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.context_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.cross_attn = XModalAttention(config, is_cross_attention=True)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = XModalMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = XModalDropPath(drop_path_rate) if drop_path_rate > 0 else None

    def _residual_branch(self, branch: torch.Tensor, packing: _TokenPacking | None = None) -> torch.Tensor:
        """Dropout, then stochastic depth (when configured), of a branch output `(B, L, C)` (or `(N, C)`)."""
        branch = self.dropout(branch)
        return branch if self.drop_path is None else self.drop_path(branch, packing)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        encoder_index: torch.Tensor | None = None,
        packing: _TokenPacking | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(B, L, C)`, or the `(N, C)` real tokens with `packing`; masks are additive
        `(B, 1, 1 | L, Lk)`; `encoder_hidden_states` `(B, Lk, C)`, or `(M, Lk, C)` indexed by `encoder_index` `(B,)`
        (unpadded contexts only)."""
        attended = self.self_attn(self.layer_norm1(hidden_states), attention_mask, cache=cache, packing=packing)
        hidden_states = hidden_states + self._residual_branch(attended, packing)
        if self.has_cross_attention:
            context = self.context_layer_norm(encoder_hidden_states)
            cross = self.cross_attn(
                self.cross_layer_norm(hidden_states), encoder_attention_mask, context, encoder_index=encoder_index
            )
            hidden_states = hidden_states + self._residual_branch(cross, packing)
        return hidden_states + self._residual_branch(self.mlp(self.layer_norm2(hidden_states)), packing)


class XModalEncoder(nn.Module):
    """A stack of `num_hidden_layers` [`XModalEncoderLayer`] blocks, with stochastic depth rising linearly from 0 at
    the first block to `config.drop_path_rate` (when the config has one) at the last."""

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        rates = _drop_path_rates(getattr(config, "drop_path_rate", 0.0), config.num_hidden_layers)
        self.layers = nn.ModuleList([XModalEncoderLayer(config, drop_path_rate=rate) for rate in rates])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        packing: _TokenPacking | None = None,
    ) -> BaseModelOutput:
        """`hidden_states` `(B, L, C)` and an additive `attention_mask` `(B, 1, 1, L)`. With `packing`, the layers run
        on the `(N, C)` real tokens of the padded batch: `last_hidden_state` is `(N, C)`, while `hidden_states`
        (when asked) are padded back to `(B, L, C)`, zeros at the padding."""
        padded = packing.pad if packing is not None else (lambda tokens: tokens)
        all_hidden_states = (padded(hidden_states),) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, packing=packing)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (padded(hidden_states),)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


# --------------------------------------------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------------------------------------------


class XModalVisionEmbeddings(nn.Module):
    """Conv patch embedding + [CLS] token + learned position embeddings (bicubically interpolated for other
    resolutions when asked): `(B, C, H, W)` -> `(B, 1 + H/P * W/P, D)`. Patches flagged in `bool_masked_pos` are
    dropped after their position embedding is added, so the encoder sees only the visible ones (MAE, He et al. 2022):
    `(B, 1 + num_visible, D)`."""

    def __init__(self, config: XModalVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, H/P * W/P, D)`: the stride-P convolution computed as one matmul over the flattened
        non-overlapping patches (the same weights and result, without the convolution's im2col and layout
        conversions); pixels beyond the last whole patch are dropped, as the convolution does."""
        batch_size, channels, height, width = pixel_values.shape
        size = self.patch_size
        rows, columns = height // size, width // size
        patches = pixel_values[:, :, : rows * size, : columns * size]
        patches = patches.reshape(batch_size, channels, rows, size, columns, size).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch_size, rows * columns, channels * size * size)
        weight = self.patch_embedding.weight
        return F.linear(patches, weight.reshape(weight.shape[0], -1), self.patch_embedding.bias)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a `height x width` image: `(1, 1 + height/P * width/P, D)`."""
        new_height, new_width = height // self.patch_size, width // self.patch_size
        if (new_height, new_width) == (self.grid_size, self.grid_size):
            return self.position_embedding
        class_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(new_height, new_width), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, new_height * new_width, dim)
        return torch.cat([class_pos, patch_pos], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch_size, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        batch_size, _, height, width = pixel_values.shape
        size = self.config.image_size
        if not interpolate_pos_encoding and (height != size or width != size):
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model ({size}x{size}); resize the image or "
                "pass interpolate_pos_encoding=True."
            )
        if height < self.patch_size or width < self.patch_size:
            raise ValueError(f"Input image size ({height}x{width}) is smaller than the patch size {self.patch_size}.")
        patches = self.embed_patches(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, num_patches, D)
        position = self.interpolate_pos_encoding(height, width)
        patches = patches + position[:, 1:]
        if bool_masked_pos is not None:
            patches = _keep_visible(patches, bool_masked_pos)  # (B, num_visible, D)
        class_token = (self.class_embedding + position[:, :1]).expand(batch_size, -1, -1)
        return self.dropout(torch.cat([class_token, patches], dim=1))


class XModalVisionTransformer(nn.Module):
    """The built-in ViT image tower: `pixel_values` `(B, C, H, W)` -> tokens `(B, 1 + num_patches, D)`, final
    LayerNorm applied."""

    def __init__(self, config: XModalVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = XModalVisionEmbeddings(config)
        self.encoder = XModalEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        hidden_states = self.embeddings(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, bool_masked_pos=bool_masked_pos
        )
        outputs = self.encoder(hidden_states, output_hidden_states=output_hidden_states)
        outputs.last_hidden_state = self.post_layernorm(outputs.last_hidden_state)
        return outputs


class XModalTextEmbeddings(nn.Module):
    """Word + position (+ token type) embeddings, LayerNorm and dropout, as in BERT: `(B, L)` -> `(B, L, D)`."""

    def __init__(self, config: XModalTextConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Embeds token ids, or adds the position (and token type) embeddings to word embeddings computed outside.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): token ids.
            token_type_ids, position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*).
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                word embeddings used instead of `word_embeddings(input_ids)`, e.g. with learnable prompt vectors
                (CoOp). Give exactly one of `input_ids` and `inputs_embeds`.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "Give exactly one of input_ids (token ids of shape (batch_size, sequence_length)) and inputs_embeds "
                f"(word embeddings of shape (batch_size, sequence_length, {self.config.hidden_size})), got "
                f"{'both' if input_ids is not None else 'neither'}."
            )
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(
                    f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}."
                )
            if input_ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}.")
            # the id range is checked once at the model boundary (`_check_text_inputs`), not on every tower call
        elif inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch_size, sequence_length, {self.config.hidden_size}), got "
                f"{tuple(inputs_embeds.shape)}."
            )
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {length} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "truncate the text (processor(..., truncation=True, max_length=...))."
            )
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if position_ids is None:
            position_ids = torch.arange(length, device=inputs_embeds.device)[None, :]
        embeddings = inputs_embeds + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            # absent token_type_ids mean segment 0, as in BERT, so outputs agree whether or not a tokenizer sends them
            embeddings = embeddings + (
                self.token_type_embeddings(token_type_ids)
                if token_type_ids is not None
                else self.token_type_embeddings.weight[0]
            )
        return self.dropout(self.layer_norm(embeddings))


class XModalTextTransformer(nn.Module):
    """The built-in BERT-style bidirectional text tower: `input_ids` `(B, L)` (or word embeddings `inputs_embeds`
    `(B, L, D)`) -> tokens `(B, L, D)` with padding-aware self-attention and a final LayerNorm.

    On CPU a padded batch runs unpadded: the projections, MLPs and LayerNorms see only the real tokens (see
    `_TokenPacking`), so padding costs no compute outside attention; the outputs at padding positions are zeros.
    `skip_padding` (default None: on CPU only) sets where: on a GPU, gathering the real tokens needs a host
    synchronisation that cost more than the padding in `bench/train_step.py` (H200, bf16). Under `torch.compile`
    the padded layout is always kept (no data-dependent shapes)."""

    def __init__(self, config: XModalTextConfig) -> None:
        super().__init__()
        self.config = config
        self.skip_padding: bool | None = None
        self.embeddings = XModalTextEmbeddings(config)
        self.encoder = XModalEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for tokens, 0 for
                padding.
            token_type_ids, position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*).
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                word embeddings instead of `input_ids` (exactly one of the two).
        """
        hidden_states = self.embeddings(
            input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        mask = _additive_padding_mask(attention_mask, hidden_states.dtype)
        packing = None
        skip = hidden_states.device.type == "cpu" if self.skip_padding is None else self.skip_padding
        if mask is not None and skip and not torch.compiler.is_compiling():
            packing = _TokenPacking.from_mask(attention_mask)
            hidden_states = packing.unpad(hidden_states)  # (N, D)
        outputs = self.encoder(hidden_states, mask, output_hidden_states=output_hidden_states, packing=packing)
        last_hidden_state = self.final_layer_norm(outputs.last_hidden_state)
        outputs.last_hidden_state = packing.pad(last_hidden_state) if packing is not None else last_hidden_state
        return outputs


def _build_tower(
    config: PreTrainedConfig, builtin_class: type[nn.Module], builtin_config: type, use_mask_token: bool = False
) -> nn.Module:
    """The built-in tower for an xmodal tower config, else `AutoModel.from_config` (e.g. ViT, BERT) without its
    unused pooling head. For masked image modelling, `use_mask_token` gives an external tower its [MASK] patch
    embedding (BEiT/SimMIM style; the built-in tower drops masked patches instead, as MAE)."""
    # compare model types, not classes: remote code may load the config module more than once
    if config.model_type == builtin_config.model_type:
        return builtin_class(config)
    if not isinstance(getattr(config, "hidden_size", None), int):
        raise ValueError(
            f"A {config.model_type!r} tower has no integer `hidden_size`; xmodal supports transformer towers with a "
            "token sequence output (e.g. vit, clip_vision_model, bert, roberta)."
        )
    model_class = AutoModel._model_mapping[type(config)]
    parameters = inspect.signature(model_class).parameters
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in parameters else {}
    if use_mask_token:
        if "use_mask_token" not in parameters:
            raise ValueError(
                f"Masked image modelling needs a vision tower with a mask token; {model_class.__name__} has none "
                "(use the built-in tower or ViT), or set mim_loss_weight=0."
            )
        kwargs["use_mask_token"] = True
    # build in the default dtype: a tower config saved in bf16 must not make one tower bf16 and the rest fp32
    return model_class._from_config(config, dtype=torch.get_default_dtype(), **kwargs)


def _pool(
    hidden_states: torch.Tensor, mode: str, attention_mask: torch.Tensor | None = None, is_image: bool = False
) -> torch.Tensor:
    """`(B, L, D)` -> `(B, D)`: the first ([CLS]) token, or the mean of the tokens: the patches for images (the
    [CLS] token excluded, as in MAE), the non-padding tokens for text."""
    if mode == "cls":
        return hidden_states[:, 0]
    if is_image:
        hidden_states = hidden_states[:, 1:]
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class XModalFusionModel(nn.Module):
    """Cross-modal fusion: transformer layers with self-attention, cross-attention and an MLP.

    `direction="text_to_image"`: Q = text, K = V = image; `"image_to_text"`: Q = image, K = V = text; `"both"`:
    co-attention, where at every layer each stream attends to the other stream's input to that layer.
    Tower outputs of another width are first projected to `cross_config.hidden_size`. Stochastic depth rises
    linearly from 0 at the first layer to `cross_config.drop_path_rate` at the last (per pair, in each stream).
    """

    def __init__(self, config: XModalCrossConfig, vision_hidden_size: int, text_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.image_input_projection = (
            nn.Linear(vision_hidden_size, hidden) if vision_hidden_size != hidden else nn.Identity()
        )
        self.text_input_projection = (
            nn.Linear(text_hidden_size, hidden) if text_hidden_size != hidden else nn.Identity()
        )
        rates = _drop_path_rates(getattr(config, "drop_path_rate", 0.0), config.num_hidden_layers)
        layers = lambda: nn.ModuleList(  # noqa: E731
            [XModalEncoderLayer(config, has_cross_attention=True, drop_path_rate=rate) for rate in rates]
        )
        self.text_layers = layers() if config.direction in ("text_to_image", "both") else None
        self.image_layers = layers() if config.direction in ("image_to_text", "both") else None
        self.text_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps) if self.text_layers else None
        self.image_layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps) if self.image_layers else None

    def forward(
        self,
        image_hidden_states: torch.Tensor,
        text_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> XModalFusionOutput:
        """`image_hidden_states` `(B, Li, Dv)`, `text_hidden_states` `(B, Lt, Dt)`, text `attention_mask` `(B, Lt)`.
        With `image_index` `(B,)`, pair b is text b with image `image_index[b]` of `image_hidden_states` `(M, Li, Dv)`:
        when only text attends to the image, each image's keys/values are computed once for all its pairs."""
        if image_index is not None and self.image_layers is not None:
            # the image stream is updated per pair: materialise the pairs
            image_hidden_states, image_index = image_hidden_states[image_index], None
        image = self.image_input_projection(image_hidden_states)
        text = self.text_input_projection(text_hidden_states)
        text_mask = _additive_padding_mask(attention_mask, text.dtype)
        for index in range(self.config.num_hidden_layers):
            new_text = (
                self.text_layers[index](text, text_mask, image, None, encoder_index=image_index)
                if self.text_layers
                else text
            )
            image = self.image_layers[index](image, None, text, text_mask) if self.image_layers else image
            text = new_text
        if self.text_layer_norm is not None:
            text = self.text_layer_norm(text)
        if self.image_layer_norm is not None:
            image = self.image_layer_norm(image)
        if self.config.direction == "text_to_image":
            pooled = text[:, 0]
        elif self.config.direction == "image_to_text":
            pooled = image[:, 0]
        else:
            pooled = text[:, 0] * image[:, 0]
        # with image_index (text_to_image only) the image tokens were not fused: they are the caller's, projected
        image_tokens = None if image_index is not None else image
        return XModalFusionOutput(
            pooler_output=pooled, text_last_hidden_state=text, image_last_hidden_state=image_tokens
        )


# --------------------------------------------------------------------------------------------------------------
# Task heads
# --------------------------------------------------------------------------------------------------------------


class XModalMLMHead(nn.Module):
    """BERT's MLM head on fused text tokens: dense + activation + LayerNorm to the text width, then a decoder tied to
    the text tower's word embeddings: `(B, L, cross_hidden)` -> `(B, L, vocab_size)`."""

    def __init__(self, config: XModalConfig) -> None:
        super().__init__()
        cross, text = config.cross_config, config.text_config
        self.dense = nn.Linear(cross.hidden_size, text.hidden_size)
        self.activation_fn = ACT2FN[cross.hidden_act]
        self.layer_norm = nn.LayerNorm(text.hidden_size, eps=cross.layer_norm_eps)
        self.decoder = nn.Linear(text.hidden_size, text.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.activation_fn(self.dense(hidden_states))))


class XModalITMHead(nn.Linear):
    """Image-text matching logits `(N, 2)` (index 1 = match) from the fused [CLS] states `(N, cross_hidden)`.

    With `config.itm_contrastive_prior > 0` the match logit also gets `prior_weight` x the pair's contrastive logit
    `(N,)` (exp(logit_scale) x cosine similarity, detached, so matching never pulls the embeddings): the head starts
    from the dual encoder's ranking and the fusion module learns the residual, what the dual encoder misses. Without
    it, a fusion module trained from scratch stays at chance on hard negatives for hundreds of steps (ALBEF starts
    from pretrained towers). `prior_weight` is learned, initialised at `config.itm_contrastive_prior`.
    """

    def __init__(self, config: XModalConfig) -> None:
        super().__init__(config.cross_config.hidden_size, 2)
        prior = float(config.itm_contrastive_prior)
        self.prior_weight = nn.Parameter(torch.tensor(prior)) if prior > 0 else None

    def forward(self, pooled: torch.Tensor, contrastive_logits: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().forward(pooled)
        if self.prior_weight is None:
            return logits
        if contrastive_logits is None or contrastive_logits.shape != logits.shape[:1]:
            raise ValueError(
                f"This ITM head adds each pair's contrastive logit (config.itm_contrastive_prior > 0): pass "
                f"contrastive_logits of shape ({logits.shape[0]},), got "
                f"{None if contrastive_logits is None else tuple(contrastive_logits.shape)}."
            )
        prior = self.prior_weight * contrastive_logits.detach().to(logits.dtype)
        return logits + F.pad(prior[:, None], (1, 0))


class XModalVQAHead(nn.Module):
    """ViLT's VQA classifier on the fused [CLS]: `(B, cross_hidden)` -> `(B, num_labels)` answer logits."""

    def __init__(self, config: XModalConfig) -> None:
        super().__init__()
        hidden = config.cross_config.hidden_size
        self.dense = nn.Linear(hidden, 2 * hidden)
        self.activation_fn = ACT2FN[config.cross_config.hidden_act]
        self.layer_norm = nn.LayerNorm(2 * hidden, eps=config.cross_config.layer_norm_eps)
        self.classifier = nn.Linear(2 * hidden, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer_norm(self.activation_fn(self.dense(pooled))))


class XModalMIMDecoder(nn.Module):
    """MAE's decoder (He et al. 2022): the encoded visible patches, projected to the decoder width, are put back in
    place among shared [MASK] tokens, given position embeddings, passed through the self-attention blocks of
    `config.mim_decoder_config`, and a linear head predicts every patch's pixels: `(B, 1 + num_visible, D)` and
    `bool_masked_pos` `(B, N)` -> `(B, N, P * P * C)`. Tokens of an external tower that kept all patches (with its
    own mask token, SimMIM style) are used as they are."""

    def __init__(self, config: XModalConfig, input_size: int) -> None:
        super().__init__()
        vision, decoder = config.vision_config, config.mim_decoder_config
        self.num_patches = (vision.image_size // vision.patch_size) ** 2
        self.input_projection = nn.Linear(input_size, decoder.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_patches, decoder.hidden_size))
        self.layers = nn.ModuleList([XModalEncoderLayer(decoder) for _ in range(decoder.num_hidden_layers)])
        self.layer_norm = nn.LayerNorm(decoder.hidden_size, eps=decoder.layer_norm_eps)
        self.head = nn.Linear(decoder.hidden_size, vision.patch_size**2 * vision.num_channels)

    def forward(self, hidden_states: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        num_patches = bool_masked_pos.shape[1]
        if num_patches != self.num_patches:
            raise ValueError(
                f"Masked image modelling runs at the configured resolution ({self.num_patches} patches), got "
                f"{num_patches} patches; resize the images instead of interpolating position embeddings."
            )
        tokens = self.input_projection(hidden_states[:, 1:])  # drop [CLS]
        if tokens.shape[1] == num_patches:
            full = tokens
        else:
            masked = bool_masked_pos.bool()
            full = _restore_visible(tokens, masked) + masked.unsqueeze(-1).to(tokens.dtype) * self.mask_token
        full = full + self.position_embedding
        for layer in self.layers:
            full = layer(full)
        return self.head(self.layer_norm(full))


class XModalTextDecoder(nn.Module):
    """The captioning decoder: token + position embeddings, then layers of causal (cached) self-attention,
    cross-attention to the image tokens and an MLP (BLIP/CoCa): `input_ids` `(B, L)` and image tokens
    `(B, Li, vision_hidden)` -> `(B, L, decoder_hidden)`."""

    def __init__(self, config: XModalDecoderConfig, vision_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.encoder_projection = (
            nn.Linear(vision_hidden_size, config.hidden_size)
            if vision_hidden_size != config.hidden_size
            else nn.Identity()
        )
        self.layers = nn.ModuleList(
            [
                XModalEncoderLayer(config, has_cross_attention=True, is_causal=True, layer_idx=index)
                for index in range(config.num_hidden_layers)
            ]
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        check_values: bool = True,
    ) -> torch.Tensor:
        """`attention_mask` `(B, past + L)` covers the cached tokens too; returns `(B, L, decoder_hidden)`. The ids
        are checked against the vocabulary unless `check_values=False` (a caller that checked them already)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}.")
        past_length = cache.get_seq_length() if cache is not None else 0
        length = input_ids.shape[1]
        if past_length + length > self.config.max_position_embeddings:
            raise ValueError(
                f"The decoder sequence ({past_length + length} tokens) exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; lower max_new_tokens or truncate the prompt."
            )
        if check_values:
            _check_ranges(
                _text_id_ranges(self.config, input_ids, accepted_by="the captioning decoder", prefix="decoder ")
            )
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=input_ids.device)[None, :]
        hidden_states = self.dropout(self.embed_tokens(input_ids) + self.embed_positions(position_ids))
        mask = _causal_mask(attention_mask, length, past_length, hidden_states.dtype, hidden_states.device)
        image = self.encoder_projection(encoder_hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, image, None, cache=cache)
        return self.final_layer_norm(hidden_states)


class XModalMomentumEncoder(nn.Module):
    """MoCo/ALBEF momentum encoders and queues: exponential moving averages of the towers and projections, whose
    embeddings of past batches serve as `queue_size` extra negatives per positive.

    The queues are buffers; they and the momentum weights are left out of `save_pretrained` unless
    `config.save_queue` (they are always in `state_dict()`, so training checkpoints resume exactly). The momentum
    weights are copied from the online model on the first training step (`initialized` is 0 until then).
    """

    def __init__(self, model: XModalModel, config: XModalConfig) -> None:
        super().__init__()
        self.momentum = config.momentum
        self.vision_model = copy.deepcopy(model.vision_model)
        self.text_model = copy.deepcopy(model.text_model)
        self.visual_projection = copy.deepcopy(model.visual_projection)
        self.text_projection = copy.deepcopy(model.text_projection)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("image_queue", torch.zeros(config.queue_size, config.projection_dim))
        self.register_buffer("text_queue", torch.zeros(config.queue_size, config.projection_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if not config.save_queue:
            self._keys_to_ignore_on_save = set(self.state_dict())
        self._keys_to_ignore_on_load_missing = {r"momentum_encoder\."}

    def _pairs(self, model: XModalModel) -> list[tuple[nn.Parameter, nn.Parameter]]:
        names = ("vision_model", "text_model", "visual_projection", "text_projection")
        return [
            pair
            for name in names
            for pair in zip(getattr(model, name).parameters(), getattr(self, name).parameters(), strict=True)
        ]

    @torch.no_grad()
    def update(self, model: XModalModel) -> None:
        """theta_m <- m theta_m + (1 - m) theta (a copy on the first call)."""
        if not bool(self.initialized):
            for online, momentum in self._pairs(model):
                momentum.copy_(online)
            self.initialized.fill_(True)
            return
        for online, momentum in self._pairs(model):
            momentum.lerp_(online, 1.0 - self.momentum)

    @torch.no_grad()
    def embed(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        config: XModalConfig,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised momentum embeddings `(B, projection_dim)` of the images and texts."""
        kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
        image = self.vision_model(pixel_values=pixel_values, **kwargs).last_hidden_state
        text = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        image = self.visual_projection(_pool(image, config.vision_pooling, is_image=True))
        text = self.text_projection(_pool(text, config.text_pooling, attention_mask))
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    @torch.no_grad()
    def enqueue(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
        """Writes a batch `(B, projection_dim)` over the oldest queue entries (a ring buffer). Pairs with a
        non-finite embedding are left out: one would poison every later loss while it stays queued."""
        finite = torch.isfinite(image_embeds).all(dim=1) & torch.isfinite(text_embeds).all(dim=1)
        if not bool(finite.all()):
            image_embeds, text_embeds = image_embeds[finite], text_embeds[finite]
        size, batch_size = self.image_queue.shape[0], image_embeds.shape[0]
        if batch_size > size:
            image_embeds, text_embeds, batch_size = image_embeds[-size:], text_embeds[-size:], size
        index = (int(self.queue_ptr) + torch.arange(batch_size, device=self.queue_ptr.device)) % size
        self.image_queue[index] = image_embeds.to(self.image_queue.dtype)
        self.text_queue[index] = text_embeds.to(self.text_queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + batch_size) % size)


# --------------------------------------------------------------------------------------------------------------
# Pretrained models
# --------------------------------------------------------------------------------------------------------------


def _build_fusion(config: XModalConfig) -> XModalFusionModel | None:
    """The fusion module sized for the configured towers, or None for a pure dual encoder."""
    if config.cross_config.num_hidden_layers == 0:
        return None
    return XModalFusionModel(config.cross_config, config.vision_config.hidden_size, config.text_config.hidden_size)


def _require_stream(config: XModalConfig, stream: str, purpose: str) -> None:
    """Raises unless the fusion module exists and produces fused `stream` ("text" or "image") tokens."""
    directions = {"text": ("text_to_image", "both"), "image": ("image_to_text", "both")}[stream]
    if config.cross_config.num_hidden_layers == 0 or config.cross_config.direction not in directions:
        raise ValueError(
            f"{purpose} needs fused {stream} tokens: set cross_config.num_hidden_layers > 0 and cross_config.direction "
            f"to one of {directions} (got {config.cross_config.num_hidden_layers} layers, "
            f"direction {config.cross_config.direction!r})."
        )


class XModalPreTrainedModel(PreTrainedModel):
    """Weight initialisation, the encoders' plumbing and the transformers integration shared by every xmodal model.

    Every head names its parts alike (`vision_model`, `text_model`, `cross_model`, `visual_projection`, ...), so
    loading any head from a checkpoint of any other loads the shared weights and initialises only the new ones
    (transformers lists them in its load report).
    """

    config_class = XModalConfig
    config: XModalConfig
    base_model_prefix = "xmodal"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["XModalEncoderLayer", "XModalVisionEmbeddings", "XModalTextEmbeddings"]
    accepts_loss_kwargs = False

    def __init__(self, config: XModalConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        # The towers and fusion layers are plain modules reading their sub-config: the setter propagates the
        # attention implementation to every sub-config.
        self.config._attn_implementation = self.config._attn_implementation

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any, **kwargs: Any
    ) -> PreTrainedModel | tuple[PreTrainedModel, dict]:
        r"""`PreTrainedModel.from_pretrained` with xmodal's loading policy (all keyword arguments are transformers').

        - Weights are read from safetensors files only, unless `use_safetensors=False` is passed: a folder that holds
          only pickle-based weights (`pytorch_model.bin`, `.pt`, ...) is refused with an `OSError`. With
          `use_safetensors=False`, `pytorch_model.bin` is read with `torch.load(weights_only=True)`, which refuses
          anything but tensors; `weights_only=False` is refused.
        - A truncated or corrupted safetensors file raises an `OSError` naming the file.
        - Checkpoint tensors whose shape differs from the model's raise a `ValueError` naming the weights and every
          such tensor with both shapes (unless `ignore_mismatched_sizes=True`, which re-initialises them).
        - Missing image- or text-tower weights raise a `ValueError` naming them; other missing weights (a new head,
          a fusion module added by a config override) are initialised and listed in transformers' load report.

        Invalid config.json fields raise in `XModalConfig.from_dict`, naming the file and the field.
        """
        if kwargs.get("weights_only", True) is not True:
            raise ValueError(
                "xmodal reads pickle-based weights only with torch.load(weights_only=True): weights_only=False would "
                "let the file execute arbitrary code. Convert the weights to safetensors instead."
            )
        path = None if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder", "") or ""
        if kwargs.get("use_safetensors") is None:
            # a Hub repo without safetensors weights is refused by transformers ("... cannot be loaded with
            # `safetensors`"); a local folder or file is checked here, for an error that says why and what to do
            if path is not None and kwargs.get("gguf_file") is None:
                _refuse_pickle_only(path, subfolder)
            kwargs["use_safetensors"] = True
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            # mismatched shapes are reported below, with the tensors named, instead of transformers' generic error
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
        except SafetensorError as err:
            raise OSError(
                f"Cannot read the weights file {_damaged_weights_file(path, subfolder)}: {err}. The file is truncated or "
                "corrupted (e.g. an interrupted download, copy or save); download or save it again."
            ) from err
        source = _weights_source(path, subfolder, kwargs["use_safetensors"] is not False)
        mismatched = sorted(info["mismatched_keys"])
        if mismatched and not ignore_mismatched_sizes:
            shapes = "; ".join(f"{key}: checkpoint {tuple(old)} vs model {tuple(new)}" for key, old, new in mismatched)
            raise ValueError(
                f"The weights in {source} do not fit {cls.__name__} built from its config: {len(mismatched)} "
                f"tensor(s) have another shape ({shapes}). The config.json and the weights disagree (a missing or "
                "edited config field?); pass ignore_mismatched_sizes=True only to re-initialise these tensors on "
                "purpose (e.g. a classifier with another number of labels)."
            )
        missing = sorted(key for key in info["missing_keys"] if key.split(".")[0] in _REQUIRED_PREFIXES)
        if missing:
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise ValueError(
                f"The weights in {source} lack tensors of the pretrained towers: {shown}. The checkpoint is incomplete "
                f"or of another model; to start from partial weights on purpose, build {cls.__name__}(config) and "
                "call load_state_dict(..., strict=False)."
            )
        return (model, info) if output_loading_info else model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XModalVisionEmbeddings):
            init.trunc_normal_(module.class_embedding, std=module.config.initializer_range)
            init.trunc_normal_(module.position_embedding, std=module.config.initializer_range)
        elif isinstance(module, XModalMIMDecoder):
            init.zeros_(module.mask_token)
            init.trunc_normal_(module.position_embedding, std=self.config.initializer_range)
        elif isinstance(module, XModalMLMHead):
            init.zeros_(module.decoder.bias)
        elif isinstance(module, XModalITMHead) and module.prior_weight is not None:
            init.constant_(module.prior_weight, self.config.itm_contrastive_prior)
        elif isinstance(module, XModalMomentumEncoder):
            for queue in (module.image_queue, module.text_queue):
                init.copy_(queue, F.normalize(torch.randn(queue.shape), dim=-1))
            init.zeros_(module.queue_ptr)
            init.zeros_(module.initialized)
        if isinstance(module, XModalModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, self.config.logit_bias_init_value)

    def _vocabularies(self) -> list[tuple[nn.Module, str, nn.Module | None, str, PreTrainedConfig]]:
        """`(owner, embedding attribute, head owner, head attribute, config)` of each token vocabulary: the text
        tower's (with the MLM head) and the captioning decoder's (with the LM head)."""
        vocabularies = []
        if getattr(self, "text_model", None) is not None:
            vocabularies.append(
                (
                    self.text_model.embeddings,
                    "word_embeddings",
                    getattr(self, "mlm_head", None),
                    "decoder",
                    self.config.text_config,
                )
            )
        if getattr(self, "text_decoder", None) is not None:
            vocabularies.append((self.text_decoder, "embed_tokens", self, "lm_head", self.config.decoder_config))
        return vocabularies

    def _main_vocabulary(self) -> tuple[nn.Module, str, nn.Module | None, str, PreTrainedConfig]:
        vocabularies = self._vocabularies()
        if not vocabularies:
            raise NotImplementedError(f"{type(self).__name__} has no token embeddings (no text tower or decoder).")
        return vocabularies[0]

    def get_input_embeddings(self) -> nn.Embedding:
        owner, name, *_ = self._main_vocabulary()
        return getattr(owner, name)

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        owner, name, *_ = self._main_vocabulary()
        setattr(owner, name, value)

    def get_output_embeddings(self) -> nn.Linear | None:
        _, _, head_owner, head_name, _ = self._main_vocabulary()
        return getattr(head_owner, head_name) if head_owner is not None else None

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resizes every vocabulary of the model to the tokenizer's new size (the text tower's embeddings and MLM
        head, the decoder's embeddings and LM head: they share one tokenizer), keeps the ties and updates
        `text_config.vocab_size` / `decoder_config.vocab_size`. Returns the first resized embedding."""
        resized = []
        for owner, name, head_owner, head_name, config in self._vocabularies():
            embeddings = self._get_resized_embeddings(
                getattr(owner, name), new_num_tokens, pad_to_multiple_of, mean_resizing
            )
            setattr(owner, name, embeddings)
            head = getattr(head_owner, head_name) if head_owner is not None else None
            if head is not None:
                setattr(
                    head_owner,
                    head_name,
                    self._get_resized_lm_head(head, embeddings.num_embeddings, mean_resizing=mean_resizing),
                )
            config.vocab_size = embeddings.num_embeddings
            resized.append(embeddings)
        if not resized:
            raise ValueError(f"{type(self).__name__} has no token vocabulary to resize.")
        self.tie_weights()
        return resized[0]

    def _encode_image(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        _check_pixel_values(pixel_values, getattr(self.config.vision_config, "num_channels", None))
        kwargs: dict[str, Any] = {"output_hidden_states": output_hidden_states}
        if interpolate_pos_encoding:
            kwargs["interpolate_pos_encoding"] = True
        if bool_masked_pos is not None:
            kwargs["bool_masked_pos"] = bool_masked_pos
        return self.vision_model(pixel_values=pixel_values, **kwargs)

    def _encode_text(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        check_values: bool = True,
    ) -> BaseModelOutput:
        """The text tower's output for token ids `(B, L)` or, instead, word embeddings `inputs_embeds` `(B, L, D)`;
        `check_values=False` skips the id ranges (a caller that checked them already, see `_check_text_inputs`)."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError(
                "input_ids is required (an integer tensor of shape (batch_size, sequence_length)), or instead "
                "inputs_embeds (word embeddings of shape (batch_size, sequence_length, text_hidden_size))."
            )
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("Give exactly one of input_ids and inputs_embeds, not both.")
        _check_text_inputs(
            self.config.text_config,
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            check_values,
        )
        kwargs = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
        }
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        return self.text_model(attention_mask=attention_mask, output_hidden_states=output_hidden_states, **kwargs)

    def fuse(
        self,
        image_hidden_states: torch.Tensor,
        text_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> XModalFusionOutput:
        """Runs the fusion module on tower outputs already computed (so objectives can share one tower pass).

        Args:
            image_hidden_states (`torch.FloatTensor` of shape `(num_images, num_image_tokens, vision_hidden_size)`).
            text_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): text padding mask.
            image_index (`torch.LongTensor` of shape `(batch_size,)`, *optional*): the image of each text (default:
                image i with text i, `num_images == batch_size`); an image used by several pairs is projected once.
        """
        if getattr(self, "cross_model", None) is None:
            raise ValueError("This model has no fusion module (cross_config.num_hidden_layers=0).")
        num_images, num_texts = image_hidden_states.shape[0], text_hidden_states.shape[0]
        if image_index is None and num_images != num_texts:
            raise ValueError(
                f"Fusion pairs images with texts one to one: got {num_images} images and {num_texts} texts "
                "(pass image_index to pair texts with images otherwise)."
            )
        if image_index is not None:
            if image_index.shape != (num_texts,):
                raise ValueError(
                    f"image_index must be {num_texts} indices in [0, {num_images}), got shape "
                    f"{tuple(image_index.shape)}."
                )
            _check_ranges(
                [_Range("image_index", image_index, num_images, f"num_images={num_images}", "the fusion module")]
            )
        return self.cross_model(image_hidden_states, text_hidden_states, attention_mask, image_index)

    def _fused_pairs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        interpolate_pos_encoding: bool,
    ) -> XModalFusionOutput:
        image = self._encode_image(pixel_values, interpolate_pos_encoding)
        text = self._encode_text(input_ids, attention_mask, token_type_ids)
        return self.fuse(image.last_hidden_state, text.last_hidden_state, attention_mask)


class XModalModel(XModalPreTrainedModel):
    """The xmodal model: image and text towers, a contrastive projection with a learnable temperature, and a
    cross-modal fusion module.

    `forward` gives image-text similarity logits (and the contrastive loss with `return_loss=True`);
    `get_image_features` / `get_text_features` give projected embeddings; `get_multimodal_features` gives the
    fused representation of image-text pairs.
    """

    main_input_name = "input_ids"
    _vision_mask_token = False

    def __init__(self, config: XModalConfig) -> None:
        super().__init__(config)
        self.vision_model = _build_tower(
            config.vision_config, XModalVisionTransformer, XModalVisionConfig, use_mask_token=self._vision_mask_token
        )
        self.text_model = _build_tower(config.text_config, XModalTextTransformer, XModalTextConfig)
        vision_hidden, text_hidden = config.vision_config.hidden_size, config.text_config.hidden_size
        self.visual_projection = nn.Linear(vision_hidden, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_hidden, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
            if config.contrastive_loss_type == "siglip"
            else None
        )
        self.cross_model = _build_fusion(config)
        self._init_head()
        self.post_init()

    def _init_head(self) -> None:
        """Adds a subclass's own modules before `post_init`."""

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        r"""Projected image embeddings.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            interpolate_pos_encoding (`bool`): interpolate the position embeddings for another resolution.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` `(batch_size, projection_dim)` is the projected,
            unnormalised image embedding and `last_hidden_state` `(batch_size, num_tokens, hidden_size)` the tower's.
        """
        outputs = self._encode_image(pixel_values, interpolate_pos_encoding, output_hidden_states)
        pooled = _pool(outputs.last_hidden_state, self.config.vision_pooling, is_image=True)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.visual_projection(pooled),
            hidden_states=outputs.hidden_states,
        )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling:
        r"""Projected text embeddings.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for tokens,
                0 for padding.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`,
                *optional*): word embeddings used instead of `input_ids` (e.g. learnable prompt vectors followed by
                the embeddings of a class name, as in CoOp); the tower adds its position embeddings. Give exactly one
                of `input_ids` and `inputs_embeds`.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` `(batch_size, projection_dim)` is the projected,
            unnormalised text embedding.
        """
        outputs = self._encode_text(
            input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, inputs_embeds
        )
        pooled = _pool(outputs.last_hidden_state, self.config.text_pooling, attention_mask)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.text_projection(pooled),
            hidden_states=outputs.hidden_states,
        )

    @can_return_tuple
    def get_multimodal_features(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> XModalFusionOutput:
        r"""The fused representation of image-text pairs (image i with text i).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*).

        Returns:
            [`XModalFusionOutput`] with `pooler_output` `(batch_size, cross_hidden_size)`.
        """
        return self._fused_pairs(input_ids, pixel_values, attention_mask, token_type_ids, interpolate_pos_encoding)

    def clamped_logit_scale(self) -> torch.Tensor:
        """The inverse temperature exp(logit_scale), clamped at `config.max_logit_scale` (CLIP)."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities `(num_texts, num_images)` of L2-normalised embeddings, with the learnable
        temperature clamped so that exp(logit_scale) <= max_logit_scale (CLIP)."""
        logits = self.clamped_logit_scale() * text_embeds @ image_embeds.t()
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def _embeds(
        self, image_hidden_states: torch.Tensor, text_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised projected embeddings `(B, projection_dim)` of the towers' outputs."""
        config = self.config
        image = _pool(image_hidden_states, config.vision_pooling, is_image=True)
        text = _pool(text_hidden_states, config.text_pooling, attention_mask)
        return F.normalize(self.visual_projection(image), dim=-1), F.normalize(self.text_projection(text), dim=-1)

    def pair_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """The contrastive logit `(N,)` of image i with text i, from L2-normalised `(N, projection_dim)` embeddings:
        the diagonal of `logits` without the `(N, N)` matrix."""
        logits = self.clamped_logit_scale() * (text_embeds * image_embeds).sum(dim=-1)
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def contrastive_objective(self, logits_per_text: torch.Tensor) -> torch.Tensor:
        """The configured contrastive loss of a square `(batch_size, batch_size)` logits matrix: InfoNCE with label
        smoothing, or the SigLIP sigmoid loss."""
        if self.config.contrastive_loss_type == "siglip":
            return siglip_loss(logits_per_text)
        return contrastive_loss(logits_per_text, self.config.label_smoothing)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
    ) -> XModalOutput:
        r"""Image-text similarities of every image against every text.

        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`).
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, num_channels, height, width)`).
            attention_mask (`torch.Tensor` of shape `(text_batch_size, sequence_length)`, *optional*).
            token_type_ids, position_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`, *optional*).
            return_loss (`bool`, *optional*): compute the symmetric InfoNCE loss (needs equal batch sizes, pair i
                being image i with text i).
            interpolate_pos_encoding (`bool`): accept images of another resolution.

        Returns:
            [`XModalOutput`].
        """
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, output_hidden_states)
        text_outputs = self.get_text_features(
            input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states
        )
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        logits_per_text = self.logits(image_embeds, text_embeds)
        loss = None
        if return_loss:
            _check_pairs(logits_per_text)
            loss = self.contrastive_objective(logits_per_text)
        return XModalOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str | PreTrainedModel,
        text_model_name_or_path: str | PreTrainedModel,
        **config_overrides: Any,
    ) -> XModalModel:
        r"""Builds an xmodal model around pretrained towers, in the spirit of `VisionTextDualEncoderModel`.

        Args:
            vision_model_name_or_path: a folder / Hub id / model instance of any transformers vision model with a
                token-sequence output (e.g. ViT), or of an xmodal model, whose image tower is then taken.
            text_model_name_or_path: likewise for the text tower (e.g. BERT, MiniLM).
            **config_overrides: fields of [`XModalConfig`] (`projection_dim`, `cross_config`, `text_pooling`, ...).

        The towers' weights are loaded; the projections, temperature and fusion module are newly initialised.
        """
        vision = _load_tower(vision_model_name_or_path, "vision_model")
        text = _load_tower(text_model_name_or_path, "text_model")
        config = XModalConfig.from_vision_text_configs(vision.config, text.config, **config_overrides)
        model = cls(config)
        for name, tower in (("vision_model", vision), ("text_model", text)):
            missing, unexpected = getattr(model, name).load_state_dict(tower.state_dict(), strict=False)
            if missing:
                raise ValueError(f"The pretrained {name} lacks weights the tower needs: {missing[:5]}...")
            if unexpected:
                logger.info(f"Ignored {len(unexpected)} unused weights of the pretrained {name}: {unexpected[:5]}")
        return model


def _load_tower(name_or_model: str | PreTrainedModel, attribute: str) -> PreTrainedModel | nn.Module:
    """A tower from a path / Hub id / model; an xmodal model contributes its own `vision_model`/`text_model`."""
    model = name_or_model if isinstance(name_or_model, nn.Module) else AutoModel.from_pretrained(name_or_model)
    if getattr(getattr(model, "config", None), "model_type", None) == XModalConfig.model_type:
        return getattr(model, attribute)
    if not hasattr(model, "config"):
        raise TypeError(f"{attribute} must be a transformers model or a path to one, got {type(model).__name__}.")
    # a task model (e.g. ViTForImageClassification) contributes its base model (ViTModel)
    return getattr(model, "base_model", model)


@dataclass
class XModalForPreTrainingOutput(ModelOutput):
    r"""Output of [`XModalForPreTraining`]. Each objective's loss is returned unweighted; `loss` is the weighted
    sum of the enabled ones. Objectives that are disabled (weight 0) or not asked for (`return_loss=False`) are None.

    Args:
        loss (`torch.FloatTensor` of shape `()`): sum of `config.<objective>_loss_weight` x loss.
        contrastive_loss, itm_loss, mlm_loss, mim_loss, captioning_loss, vqa_loss (`torch.FloatTensor` of shape `()`).
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`), logits_per_text: the transpose.
        image_embeds, text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised.
        itm_logits (`torch.FloatTensor` of shape `(batch_size, 2)`, or `(3 * batch_size, 2)` with
            `itm_sampling="all"`: positives, then text-with-negative-image, then image-with-negative-text).
        mlm_logits (`torch.FloatTensor` of shape `(num_masked_tokens, vocab_size)`): at the masked positions only
            (row-major order), where the vocabulary projection is computed.
        mim_logits (`torch.FloatTensor` of shape `(batch_size, num_patches, patch_size**2 * num_channels)`).
        captioning_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
        vqa_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`).
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    mim_loss: torch.FloatTensor | None = None
    captioning_loss: torch.FloatTensor | None = None
    vqa_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    mlm_logits: torch.FloatTensor | None = None
    mim_logits: torch.FloatTensor | None = None
    captioning_logits: torch.FloatTensor | None = None
    vqa_logits: torch.FloatTensor | None = None


@dataclass
class XModalImageTextRetrievalOutput(ModelOutput):
    r"""Output of [`XModalForImageTextRetrieval`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): contrastive + ITM loss, with `return_loss=True`.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`), logits_per_text.
        itm_scores_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`, *optional*): with
            `rerank_top_k`, the ITM match log-odds of each text's top-k images by contrastive score, -inf elsewhere;
            rank images by it.
        itm_logits (`torch.FloatTensor` of shape `(batch_size, 2)`, or `(3 * batch_size, 2)` with
            `itm_sampling="all"`, *optional*): the ITM logits of the loss.
        image_embeds, text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_scores_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


class BatchGatherer(Protocol):
    """What the training code passes as `global_batch` so that objectives draw negatives from every process's batch
    (the model itself never calls `torch.distributed`; `xmodal.training.losses.GlobalBatch` implements this).

    `gather(tensor)` concatenates `(B, ...)` tensors of every process in rank order (dimensions after the first padded
    with zeros to the largest size), differentiably; `rank` is this process's position.
    """

    rank: int

    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...


class _LocalBatch:
    """The single-process `BatchGatherer`: nothing to gather."""

    rank = 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _caption_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One int64 key per caption `(B,)`, equal for identical captions whatever their padding (a position-weighted sum
    of the token ids, wrapping around; a collision only removes a candidate negative)."""
    # positions among the real tokens, so that left and right padding give the same key
    positions = attention_mask.long().cumsum(dim=1) - 1
    weights = positions * 6364136223846793005 + 1442695040888963407  # Knuth's MMIX LCG constants
    return ((input_ids.long() * attention_mask.long() + 1) * weights * attention_mask.long()).sum(dim=1)


def _rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """`tensor[rows]` (the first dimension), None for None."""
    return None if tensor is None else tensor[rows]


def _itm_pairs(
    logits_text_to_image: torch.Tensor, logits_image_to_text: torch.Tensor, allowed: torch.Tensor, hard: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples one negative image per text and one negative text per image (ALBEF) among the `allowed` candidates
    `(B, M)` (not the true pair, nor a caption identical to it): from softmax(similarities `(B, M)`) when `hard`, else
    uniformly. Not differentiated.

    Returns `(negative_image_index, negative_text_index, has_negative)`, each `(B,)`, indices into the M candidates;
    a row with no allowed candidate has no negative (`has_negative` False, a dummy index)."""
    with torch.no_grad():
        has_negative = allowed.any(dim=1)
        picks = []
        for logits in (logits_text_to_image, logits_image_to_text):
            weights = F.softmax(logits.float(), dim=1) if hard else torch.ones_like(logits, dtype=torch.float)
            weights = weights * allowed
            # the softmax may underflow on every allowed entry: uniform over them then
            weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, allowed.float())
            weights = torch.where(has_negative[:, None], weights, torch.ones_like(weights))
            picks.append(torch.multinomial(weights, 1).squeeze(1))
    return picks[0], picks[1], has_negative


def _itm_inputs(
    model: XModalModel,
    text_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    global_batch: BatchGatherer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image-text matching pairs of this process's B texts and images, with negatives sampled by `_itm_pairs` from
    the global batch of M = N x B pairs (M = B on one process):

    - `config.itm_sampling="all"` (ALBEF): B positives, B texts with a negative image, B images with a negative text;
    - `"half"` (the UNITER/ViLT budget): B pairs, each kept with probability 1/2, else given a negative image or a
      negative text (1/4 each); a pair with no possible negative stays positive.

    Returns `(texts (n, L, D), attention_mask (n, L), image_index (n,), labels (n,), contrastive_logits (n,))`,
    n = 3B or B, with `image_index` into the global batch's images; labels are 1 for a match, 0 for a negative, -100
    for a negative that could not be drawn; `contrastive_logits` are each pair's (detached), for `XModalITMHead`."""
    batch_size = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    index = global_batch.rank * batch_size + torch.arange(batch_size, device=input_ids.device)
    with torch.no_grad():
        all_keys = global_batch.gather(_caption_keys(input_ids, attention_mask))
        allowed = all_keys[None, :] != _caption_keys(input_ids, attention_mask)[:, None]  # (B, M)
        all_image_embeds, all_text_embeds = (
            global_batch.gather(image_embeds.detach()),
            global_batch.gather(text_embeds.detach()),
        )
        text_to_image = model.logits(all_image_embeds, text_embeds)
        image_to_text = model.logits(image_embeds, all_text_embeds).t()
    all_texts, all_masks = global_batch.gather(text_hidden_states), global_batch.gather(attention_mask)
    neg_image, neg_text, has_negative = _itm_pairs(
        text_to_image, image_to_text, allowed, model.config.itm_hard_negatives
    )
    ones = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
    if model.config.itm_sampling == "half":
        with torch.no_grad():
            draw = torch.rand(batch_size, device=input_ids.device)
            swap_image = (draw < 0.25) & has_negative
            swap_text = (draw >= 0.25) & (draw < 0.5) & has_negative
            image_index = torch.where(swap_image, neg_image, index)
            text_index = torch.where(swap_text, neg_text, index)
            labels = torch.where(swap_image | swap_text, torch.zeros_like(ones), ones)
    else:
        text_index, image_index = torch.cat([index, index, neg_text]), torch.cat([index, neg_image, index])
        negative = torch.where(has_negative, torch.zeros_like(ones), torch.full_like(ones, -100))
        labels = torch.cat([ones, negative, negative])
    with torch.no_grad():
        prior = model.pair_logits(all_image_embeds[image_index], all_text_embeds[text_index])
    return all_texts[text_index], all_masks[text_index], image_index, labels, prior


def _itm_loss(
    model: XModalModel,
    image_hidden_states: torch.Tensor,
    text_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text matching (ALBEF) from tower outputs `(B, L, D)` and embeddings `(B, projection_dim)`. Returns
    `(loss, itm_logits (N, 2))`, N = B or 3B (`config.itm_sampling`)."""
    texts, masks, image_index, labels, prior = _itm_inputs(
        model, text_hidden_states, attention_mask, input_ids, image_embeds, text_embeds, _LocalBatch()
    )
    # the indices are built here: the fusion module directly, without `fuse`'s check (a device sync)
    fused = model.cross_model(image_hidden_states, texts, masks, image_index).pooler_output
    itm_logits = model.itm_head(fused, prior)
    return F.cross_entropy(itm_logits.float(), labels, ignore_index=-100), itm_logits


class XModalForImageTextRetrieval(XModalModel):
    """Retrieval: contrastive scores for every image-text pair, with image-text matching (ITM) re-ranking of each
    text's top-k images (ALBEF/BLIP). Fine-tunes with the contrastive + ITM loss."""

    def _init_head(self) -> None:
        if self.config.cross_config.num_hidden_layers == 0:
            raise ValueError("Image-text matching needs a fusion module (cross_config.num_hidden_layers > 0).")
        self.itm_head = XModalITMHead(self.config)

    @torch.no_grad()
    def _rerank(
        self,
        image_hidden_states: torch.Tensor,
        text_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        logits_per_text: torch.Tensor,
        top_k: int,
    ) -> torch.Tensor:
        num_texts, num_images = logits_per_text.shape
        top_k = min(top_k, num_images)
        candidates = logits_per_text.topk(top_k, dim=1)  # (T, k)
        if attention_mask is None:
            attention_mask = torch.ones(text_hidden_states.shape[:2], dtype=torch.long, device=logits_per_text.device)
        fused = self.fuse(
            image_hidden_states,
            text_hidden_states.repeat_interleave(top_k, dim=0),
            attention_mask.repeat_interleave(top_k, dim=0),
            image_index=candidates.indices.reshape(-1),
        ).pooler_output
        itm = self.itm_head(fused, candidates.values.reshape(-1)).float()
        log_odds = (itm[:, 1] - itm[:, 0]).reshape(num_texts, top_k)
        scores = torch.full((num_texts, num_images), float("-inf"), device=log_odds.device)
        return scores.scatter(1, candidates.indices, log_odds)

    @torch.no_grad()
    def score_pairs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """ITM logits `(batch_size, 2)` (index 1 = match) of image i with text i."""
        image = self._encode_image(pixel_values, interpolate_pos_encoding).last_hidden_state
        text = self._encode_text(input_ids, attention_mask, token_type_ids).last_hidden_state
        fused = self.fuse(image, text, attention_mask).pooler_output
        return self.itm_head(fused, self.pair_logits(*self._embeds(image, text, attention_mask)))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        rerank_top_k: int | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> XModalImageTextRetrievalOutput:
        r"""Scores every text against every image.

        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`).
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, num_channels, height, width)`).
            attention_mask (`torch.Tensor` of shape `(text_batch_size, sequence_length)`, *optional*).
            return_loss (`bool`, *optional*): contrastive + ITM (hard negatives) loss over the pairs (i, i).
            rerank_top_k (`int`, *optional*): re-rank each text's top-k images with the ITM head
                (`itm_scores_per_text`); `config.itm_rerank_top_k` is a sensible value.

        Returns:
            [`XModalImageTextRetrievalOutput`].
        """
        image = self._encode_image(pixel_values, interpolate_pos_encoding)
        text = self._encode_text(input_ids, attention_mask, token_type_ids)
        image_embeds, text_embeds = self._embeds(image.last_hidden_state, text.last_hidden_state, attention_mask)
        logits_per_text = self.logits(image_embeds, text_embeds)
        loss = itm_logits = itm_scores = None
        if return_loss:
            _check_pairs(logits_per_text)
            itm, itm_logits = _itm_loss(
                self,
                image.last_hidden_state,
                text.last_hidden_state,
                attention_mask,
                input_ids,
                image_embeds,
                text_embeds,
            )
            loss = self.contrastive_objective(logits_per_text) + itm
        if rerank_top_k:
            itm_scores = self._rerank(
                image.last_hidden_state, text.last_hidden_state, attention_mask, logits_per_text, rerank_top_k
            )
        return XModalImageTextRetrievalOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            itm_scores_per_text=itm_scores,
            itm_logits=itm_logits,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )


class XModalFusedPairsModel(XModalPreTrainedModel):
    """The towers and the fusion module, for heads that read the fused representation of image-text pairs; a
    subclass adds its head in `_init_head` and names what it needs in `_purpose` and `_fused_stream` (`"text"` when
    it reads the fused text tokens, None when the fused [CLS] suffices)."""

    main_input_name = "input_ids"
    _purpose = "This head"
    _fused_stream: str | None = None

    def __init__(self, config: XModalConfig) -> None:
        super().__init__(config)
        if self._fused_stream is not None:
            _require_stream(config, self._fused_stream, self._purpose)
        elif config.cross_config.num_hidden_layers == 0:
            raise ValueError(f"{self._purpose} needs a fusion module (cross_config.num_hidden_layers > 0).")
        self.vision_model = _build_tower(config.vision_config, XModalVisionTransformer, XModalVisionConfig)
        self.text_model = _build_tower(config.text_config, XModalTextTransformer, XModalTextConfig)
        self.cross_model = _build_fusion(config)
        self._init_head()
        self.post_init()

    def _init_head(self) -> None:
        """Adds the subclass's head before `post_init`."""


class XModalForMaskedLM(XModalFusedPairsModel):
    """Masked language modelling conditioned on the image: the text tower reads the masked text, the fusion module
    lets it attend to the image, and an MLM head tied to the word embeddings predicts the masked tokens."""

    _tied_weights_keys = {"mlm_head.decoder.weight": "text_model.embeddings.word_embeddings.weight"}
    _purpose = "Masked language modelling"
    _fused_stream = "text"

    def _init_head(self) -> None:
        self.mlm_head = XModalMLMHead(self.config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> MaskedLMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the (masked) text, e.g. from
                `xmodal.mask_tokens`.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): image i goes
                with text i.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): original ids at masked
                positions, -100 elsewhere.

        Returns:
            `MaskedLMOutput` with `loss` (when `labels` are given) and `logits` `(batch_size, sequence_length,
            vocab_size)`.
        """
        fused = self._fused_pairs(input_ids, pixel_values, attention_mask, token_type_ids, interpolate_pos_encoding)
        logits = self.mlm_head(fused.text_last_hidden_state)
        loss = masked_language_modeling_loss(logits, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits)


class XModalForVisualQuestionAnswering(XModalFusedPairsModel):
    """VQA as classification over an answer vocabulary (`config.num_labels`, `config.id2label`) from the fused
    [CLS], trained on VQA-v2 soft scores (ViLT). Generative answering is [`XModalForConditionalGeneration`] with the
    question as prompt."""

    _purpose = "Visual question answering"

    def _init_head(self) -> None:
        self.vqa_head = XModalVQAHead(self.config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> SequenceClassifierOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the questions.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            labels (`torch.FloatTensor` of shape `(batch_size, num_labels)` soft scores, or `torch.LongTensor` of
                shape `(batch_size,)` answer indices, *optional*).

        Returns:
            `SequenceClassifierOutput` with `loss` (when `labels` are given) and `logits` `(batch_size, num_labels)`.
        """
        fused = self._fused_pairs(input_ids, pixel_values, attention_mask, token_type_ids, interpolate_pos_encoding)
        logits = self.vqa_head(fused.pooler_output)
        loss = vqa_loss(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class XModalForConditionalGeneration(XModalPreTrainedModel, GenerationMixin):
    """Captioning and generative VQA: the image tower and a text decoder that cross-attends to the image tokens,
    with `generate()` (greedy, beam search, sampling) through transformers' GenerationMixin and a KV cache.

    Example:

    ```python
    >>> captions = model.generate(pixel_values=pixel_values, max_new_tokens=20, num_beams=3)
    >>> processor.batch_decode(captions, skip_special_tokens=True)
    ```
    For VQA, pass the question (without its final [SEP]) as `input_ids`: the answer is generated after it.
    """

    main_input_name = "pixel_values"
    _tied_weights_keys = {"lm_head.weight": "text_decoder.embed_tokens.weight"}

    def __init__(self, config: XModalConfig) -> None:
        super().__init__(config)
        self.vision_model = _build_tower(config.vision_config, XModalVisionTransformer, XModalVisionConfig)
        decoder = config.decoder_config
        self.text_decoder = XModalTextDecoder(decoder, config.vision_config.hidden_size)
        self.lm_head = nn.Linear(decoder.hidden_size, decoder.vocab_size, bias=False)
        self.post_init()
        self._default_special_tokens()

    def _default_special_tokens(self, force: bool = False) -> None:
        """Takes the generation config's BOS/EOS/PAD ids from `decoder_config` where they are unset, or always with
        `force` (a generation config derived from config.json reads them from the text *encoder's* config)."""
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if force or getattr(self.generation_config, name, None) is None:
                setattr(self.generation_config, name, getattr(self.config.decoder_config, name))

    def adjust_generation_fn(self, *args: Any, **kwargs: Any) -> None:
        super().adjust_generation_fn(*args, **kwargs)
        # without a generation_config.json, transformers derives one from config.json's text (encoder) config
        self._default_special_tokens(force=bool(getattr(self.generation_config, "_from_model_config", False)))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): decoder tokens starting with
                `decoder_config.bos_token_id` ([CLS]); a tokenized caption is already in this form.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): needed unless
                `encoder_hidden_states` (the image tower's tokens) are given.
            attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*).
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): usually `input_ids`
                with padding (and any prompt) set to -100; position t is trained to predict label t + 1.
            cache (`Cache`, *optional*): the decoder's KV cache (generation).
            use_cache (`bool`, *optional*): create and return a cache.
            **kwargs: generation bookkeeping flags passed by GenerationMixin (unused).

        Returns:
            `CausalLMOutputWithCrossAttentions` with `loss`, `logits` `(batch_size, sequence_length, vocab_size)`
            and `cache`.
        """
        if input_ids is None:
            raise ValueError("input_ids (decoder tokens, starting with the BOS/[CLS] id) are required.")
        if encoder_hidden_states is None:
            encoder_hidden_states = self._encode_image(pixel_values, interpolate_pos_encoding).last_hidden_state
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden_states = self.text_decoder(input_ids, encoder_hidden_states, attention_mask, position_ids, cache)
        logits = self.lm_head(hidden_states)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, cache=cache if use_cache else None)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        r"""Captions (or answers, with a question prompt in `input_ids`) for a batch of images. The image is encoded
        once; every decoding step reuses its tokens and the KV cache.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*): a prompt starting
                with the BOS id (default: BOS alone); left-pad prompts of different lengths.
            **generate_kwargs: passed to `GenerationMixin.generate` (`max_new_tokens`, `num_beams`, `do_sample`, ...).

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, length)`: the prompt and the generated
            tokens.
        """
        self._default_special_tokens()
        image = self._encode_image(pixel_values, interpolate_pos_encoding).last_hidden_state
        batch_size = image.shape[0]
        if input_ids is None:
            bos = self.generation_config.bos_token_id
            input_ids = torch.full((batch_size, 1), bos, dtype=torch.long, device=image.device)
        elif input_ids.shape[0] != batch_size:
            raise ValueError(f"Got {input_ids.shape[0]} prompts for {batch_size} images; pass one prompt per image.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = super().generate(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image, **generate_kwargs
        )
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        # transformers 5.24's beam search fills finished beams with EOS when pad_token_id is 0 (`pad or eos`)
        self._pad_after_eos(sequences, input_ids.shape[1])
        return outputs

    def _pad_after_eos(self, sequences: torch.Tensor, prompt_length: int) -> None:
        """In place: every generated token after the first generated EOS becomes PAD."""
        eos, pad = self.generation_config.eos_token_id, self.generation_config.pad_token_id
        if eos is None or pad is None:
            return
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=sequences.device)
        generated = sequences[:, prompt_length:]
        seen_eos = torch.isin(generated, eos_ids).int().cumsum(dim=1)
        after_first = (seen_eos > 1) | ((seen_eos == 1) & ~torch.isin(generated, eos_ids))
        generated.masked_fill_(after_first, pad)


def _check_pairs(logits_per_text: torch.Tensor) -> None:
    if logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise ValueError(
            f"Losses over pairs need as many texts as images (text i describing image i), got "
            f"{logits_per_text.shape[0]} texts and {logits_per_text.shape[1]} images."
        )


class XModalForPreTraining(XModalModel):
    """Multi-task pretraining with every objective of FLAVA, ALBEF, BLIP and CoCa in one model:

    - contrastive: NT-Xent / InfoNCE with the learnable temperature (optionally with label smoothing, K extra
      negatives from a momentum queue, and two augmented views) or the SigLIP sigmoid loss;
    - image-text matching with hard negatives (ALBEF); masked language modelling conditioned on the image (BERT
      80/10/10 masking, head tied to the word embeddings); masked image modelling (normalised-pixel regression of
      masked patches, MAE/SimMIM); captioning (a cross-attending decoder); VQA (soft-score answer classification).

    The loss is the sum of `config.<objective>_loss_weight` x each loss; a weight of 0 removes that objective's head
    and skips its compute. Each image and text goes through its tower once per step and the tower outputs are
    reused by every objective; only the masked views (MLM text, MIM image), the VQA questions, the optional second
    views and the momentum encoders take extra tower passes.
    """

    _tied_weights_keys = {
        "mlm_head.decoder.weight": "text_model.embeddings.word_embeddings.weight",
        "lm_head.weight": "text_decoder.embed_tokens.weight",
    }

    @property
    def _vision_mask_token(self) -> bool:
        # the built-in tower drops masked patches (MAE); an external one needs its own [MASK] embedding
        vision = self.config.vision_config
        return self.config.mim_loss_weight > 0 and vision.model_type != XModalVisionConfig.model_type

    def _init_head(self) -> None:
        config = self.config
        needs_fusion = [name for name in ("itm", "mlm", "vqa") if getattr(config, f"{name}_loss_weight") > 0]
        if needs_fusion and config.cross_config.num_hidden_layers == 0:
            raise ValueError(
                f"The objectives {needs_fusion} need a fusion module (cross_config.num_hidden_layers > 0); set their "
                "*_loss_weight to 0 for a dual encoder."
            )
        self.itm_head = XModalITMHead(config) if config.itm_loss_weight > 0 else None
        self.mlm_head = None
        if config.mlm_loss_weight > 0:
            _require_stream(config, "text", "Masked language modelling")
            self.mlm_head = XModalMLMHead(config)
        self.mim_decoder = None
        if config.mim_loss_weight > 0:
            if config.mim_source == "fused":
                _require_stream(config, "image", "Masked image modelling from the fused representation")
            width = (
                config.cross_config.hidden_size if config.mim_source == "fused" else config.vision_config.hidden_size
            )
            self.mim_decoder = XModalMIMDecoder(config, width)
        self.text_decoder = self.lm_head = None
        if config.captioning_loss_weight > 0:
            decoder = config.decoder_config
            self.text_decoder = XModalTextDecoder(decoder, config.vision_config.hidden_size)
            self.lm_head = nn.Linear(decoder.hidden_size, decoder.vocab_size, bias=False)
        self.vqa_head = XModalVQAHead(config) if config.vqa_loss_weight > 0 else None
        use_queue = config.queue_size > 0 and config.contrastive_loss_weight > 0
        self.momentum_encoder = XModalMomentumEncoder(self, config) if use_queue else None
        self._tied_weights_keys = {
            key: target
            for key, target in type(self)._tied_weights_keys.items()
            if getattr(self, key.split(".")[0]) is not None
        }

    def _fuse_requests(
        self, image: torch.Tensor, requests: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
    ) -> dict[str, XModalFusionOutput]:
        """Fuses `{name: (text tokens (N, L, D), mask (N, L) or None, image_index (N,))}` with the `(B, Li, Dv)` image
        tokens: requests of one text length go through the fusion module together."""
        by_length: dict[int, list[str]] = {}
        for name, (texts, _, _) in requests.items():
            by_length.setdefault(texts.shape[1], []).append(name)
        fused: dict[str, XModalFusionOutput] = {}
        for names in by_length.values():
            parts = [requests[name] for name in names]
            masks = [
                mask if mask is not None else torch.ones(texts.shape[:2], device=texts.device, dtype=torch.long)
                for texts, mask, _ in parts
            ]
            # the indices are the model's own: the fusion module directly, without `fuse`'s check (a device sync)
            out = self.cross_model(
                image, torch.cat([texts for texts, _, _ in parts]), torch.cat(masks), torch.cat([i for *_, i in parts])
            )
            sizes = [texts.shape[0] for texts, _, _ in parts]
            for name, pooled, tokens in zip(
                names, out.pooler_output.split(sizes), out.text_last_hidden_state.split(sizes), strict=True
            ):
                fused[name] = XModalFusionOutput(pooler_output=pooled, text_last_hidden_state=tokens)
        return fused

    def _queue_contrastive_loss(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        interpolate_pos_encoding: bool,
        global_batch: BatchGatherer,
    ) -> torch.Tensor:
        """InfoNCE where each positive (from the momentum encoders) competes with the global batch's other momentum
        embeddings and the K queued ones (ALBEF): per direction, logits `(B, M + K)` (M = N x B pairs over N
        processes) with the positive in this process's column of the batch; the global batch is enqueued."""
        momentum = self.momentum_encoder
        if self.training or not bool(momentum.initialized):
            momentum.update(self)
        image_m, text_m = momentum.embed(
            pixel_values, input_ids, attention_mask, self.config, interpolate_pos_encoding
        )
        image_m, text_m = global_batch.gather(image_m), global_batch.gather(text_m)
        scale = self.clamped_logit_scale()
        image_to_text = scale * image_embeds @ torch.cat([text_m, momentum.text_queue.clone()]).t()
        text_to_image = scale * text_embeds @ torch.cat([image_m, momentum.image_queue.clone()]).t()
        batch_size = image_embeds.shape[0]
        labels = global_batch.rank * batch_size + torch.arange(batch_size, device=image_embeds.device)
        smoothing = self.config.label_smoothing
        loss = (
            F.cross_entropy(image_to_text, labels, label_smoothing=smoothing)
            + F.cross_entropy(text_to_image, labels, label_smoothing=smoothing)
        ) / 2.0
        if self.training:
            momentum.enqueue(image_m, text_m)
        return loss

    def _contrastive(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logits_per_text: torch.Tensor,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        second_view_pixel_values: torch.Tensor | None,
        second_view_input_ids: torch.Tensor | None,
        second_view_attention_mask: torch.Tensor | None,
        interpolate_pos_encoding: bool,
        global_batch: BatchGatherer,
        check_values: bool = True,
    ) -> torch.Tensor:
        """The cross-modal loss averaged over every (image view, text view) combination, plus
        `multiview_loss_weight` x the NT-Xent between the two views of each modality that has two (the second
        view's ids checked unless `check_values=False`)."""
        if self.momentum_encoder is not None:
            first = self._queue_contrastive_loss(
                image_embeds,
                text_embeds,
                pixel_values,
                input_ids,
                attention_mask,
                interpolate_pos_encoding,
                global_batch,
            )
        else:
            first = self.contrastive_objective(logits_per_text)
        image_views, text_views = [image_embeds], [text_embeds]
        if second_view_pixel_values is not None:
            second = self.get_image_features(second_view_pixel_values, interpolate_pos_encoding).pooler_output
            image_views.append(F.normalize(second, dim=-1))
        if second_view_input_ids is not None:
            second = self._encode_text(second_view_input_ids, second_view_attention_mask, check_values=check_values)
            pooled = _pool(second.last_hidden_state, self.config.text_pooling, second_view_attention_mask)
            text_views.append(F.normalize(self.text_projection(pooled), dim=-1))
        if len(image_views) == len(text_views) == 1:
            return first
        cross = [first] + [
            self.contrastive_objective(self.logits(image, text))
            for i, image in enumerate(image_views)
            for j, text in enumerate(text_views)
            if (i, j) != (0, 0)
        ]
        scale = self.clamped_logit_scale()
        within = [nt_xent_loss(views[0], views[1], scale) for views in (image_views, text_views) if len(views) == 2]
        return torch.stack(cross).mean() + self.config.multiview_loss_weight * torch.stack(within).mean()

    def _check_id_ranges(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        second_view_input_ids: torch.Tensor | None,
        second_view_attention_mask: torch.Tensor | None,
        mlm_input_ids: torch.Tensor | None,
        question_input_ids: torch.Tensor | None,
        question_attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None,
        vqa_labels: torch.Tensor | None,
        return_loss: bool | None,
    ) -> bool:
        """Checks the shapes of every id tensor the step will use, then all their ranges (tokens in the vocabularies,
        answer indices among the answers) in one device synchronisation, instead of one per tower call. Returns
        whether all ranges were checked, so the calls below skip them (`check_values=False`); where an input is
        malformed, the call that uses it names the problem."""
        if input_ids is None:
            return False
        text_config = self.config.text_config
        complete = True
        _check_text_inputs(text_config, input_ids, attention_mask, token_type_ids, None, None, check_values=False)
        ranges = _text_id_ranges(text_config, input_ids, token_type_ids)
        if return_loss and second_view_input_ids is not None:
            _check_text_inputs(text_config, second_view_input_ids, second_view_attention_mask, None, None, None, False)
            ranges += _text_id_ranges(text_config, second_view_input_ids, prefix="second_view_")
        if return_loss and self.mlm_head is not None and mlm_input_ids is not None:
            _check_text_inputs(text_config, mlm_input_ids, attention_mask, token_type_ids, None, None, False)
            ranges += _text_id_ranges(text_config, mlm_input_ids, prefix="mlm_")
        if return_loss and self.vqa_head is not None and question_input_ids is not None and vqa_labels is not None:
            _check_text_inputs(text_config, question_input_ids, question_attention_mask, None, None, None, False)
            ranges += _text_id_ranges(text_config, question_input_ids, prefix="question_")
            if isinstance(vqa_labels, torch.Tensor):
                ranges += _vqa_label_ranges(vqa_labels, self.config.num_labels)  # none for soft scores
            else:
                complete = False
        if return_loss and self.text_decoder is not None:
            ids = decoder_input_ids if decoder_input_ids is not None else input_ids
            if isinstance(ids, torch.Tensor) and ids.ndim == 2 and not ids.is_floating_point():
                ranges += _text_id_ranges(
                    self.config.decoder_config, ids, accepted_by="the captioning decoder", prefix="decoder "
                )
            else:
                complete = False
        _check_ranges(ranges)
        return complete

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        second_view_pixel_values: torch.FloatTensor | None = None,
        second_view_input_ids: torch.LongTensor | None = None,
        second_view_attention_mask: torch.Tensor | None = None,
        mlm_input_ids: torch.LongTensor | None = None,
        mlm_labels: torch.LongTensor | None = None,
        special_tokens_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        captioning_labels: torch.LongTensor | None = None,
        question_input_ids: torch.LongTensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        vqa_labels: torch.Tensor | None = None,
        contrastive_loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        global_batch: BatchGatherer | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> XModalForPreTrainingOutput:
        r"""One multi-task pretraining step on image-text pairs (image i with text i).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the captions.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*).
            return_loss (`bool`, *optional*): compute the objectives; otherwise only the contrastive logits.
            second_view_pixel_values, second_view_input_ids, second_view_attention_mask (*optional*): a second
                augmented view of the same pairs (`xmodal.training.make_views`) for multi-view contrastive learning.
            mlm_input_ids, mlm_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                a masked copy of `input_ids` and its labels; masked here with BERT's rule when absent.
            special_tokens_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): tokens never
                masked (default: padding and `config.special_token_ids`).
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*): patches to mask
                for MIM; `config.mim_mask_ratio` of them at random when absent.
            decoder_input_ids, decoder_attention_mask, captioning_labels (*optional*): the captioning targets
                (default: the captions in `input_ids`, padding ignored).
            question_input_ids, question_attention_mask (`(batch_size, question_length)`), vqa_labels
                (`(batch_size, num_labels)` soft scores or `(batch_size,)` answer indices): one question per image,
                required when `vqa_loss_weight > 0`.
            contrastive_loss_fn (*optional*): replaces the in-batch InfoNCE with `fn(image_embeds, text_embeds,
                logit_scale)` (normalised `(B, D)` embeddings, the clamped exp(logit_scale)), e.g.
                `xmodal.training.losses.ContrastiveLoss`, which gathers the global batch across processes; not
                combinable with the momentum queue or second views.
            global_batch (*optional*): gathers tensors from every process ([`BatchGatherer`], e.g.
                `xmodal.training.losses.GlobalBatch`), so that ITM negatives and the momentum queue's in-batch
                negatives come from the global batch and the queue receives it; the local batch by default.

        Returns:
            [`XModalForPreTrainingOutput`].
        """
        config = self.config
        global_batch = global_batch if global_batch is not None else _LocalBatch()
        checked = self._check_id_ranges(
            input_ids, attention_mask, token_type_ids, second_view_input_ids, second_view_attention_mask,
            mlm_input_ids, question_input_ids, question_attention_mask, decoder_input_ids, vqa_labels, return_loss,
        )  # fmt: skip
        image = self._encode_image(pixel_values, interpolate_pos_encoding).last_hidden_state
        text = self._encode_text(input_ids, attention_mask, token_type_ids, check_values=not checked).last_hidden_state
        image_embeds, text_embeds = self._embeds(image, text, attention_mask)
        logits_per_text = self.logits(image_embeds, text_embeds)
        outputs: dict[str, torch.Tensor] = {
            "logits_per_image": logits_per_text.t(),
            "logits_per_text": logits_per_text,
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
        }
        if not return_loss:
            return XModalForPreTrainingOutput(**outputs)
        _check_pairs(logits_per_text)
        losses: dict[str, torch.Tensor] = {}
        if config.contrastive_loss_weight > 0 and contrastive_loss_fn is not None:
            if (
                self.momentum_encoder is not None
                or second_view_pixel_values is not None
                or (second_view_input_ids is not None)
            ):
                raise ValueError("contrastive_loss_fn cannot be combined with the momentum queue or second views.")
            losses["contrastive"] = contrastive_loss_fn(image_embeds, text_embeds, self.clamped_logit_scale())
        elif config.contrastive_loss_weight > 0:
            losses["contrastive"] = self._contrastive(
                image_embeds,
                text_embeds,
                logits_per_text,
                pixel_values,
                input_ids,
                attention_mask,
                second_view_pixel_values,
                second_view_input_ids,
                second_view_attention_mask,
                interpolate_pos_encoding,
                global_batch,
                check_values=not checked,
            )
        # Fusion requests of the ITM, MLM and VQA objectives; those of equal text length share one fusion call, in
        # which each image's cross-attention keys/values are computed once.
        # With ITM, the fused images are the global batch's (its negatives may come from any process).
        requests: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        images, batch_index = image, torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.itm_head is not None:
            images, batch_index = global_batch.gather(image), batch_index + global_batch.rank * input_ids.shape[0]
            itm_texts, itm_masks, itm_index, itm_labels, itm_prior = _itm_inputs(
                self, text, attention_mask, input_ids, image_embeds, text_embeds, global_batch
            )
            requests["itm"] = (itm_texts, itm_masks, itm_index)
        # MLM, VQA, MIM and captioning see the first `auxiliary_batch_size` pairs only (their cost grows with the
        # pairs they see; the contrastive loss and ITM keep every pair and its negatives)
        rows = slice(None) if config.auxiliary_batch_size is None else slice(0, config.auxiliary_batch_size)
        aux_ids, aux_mask, aux_types = input_ids[rows], _rows(attention_mask, rows), _rows(token_type_ids, rows)
        aux_image, aux_text, aux_index = image[rows], text[rows], batch_index[rows]
        special_tokens_mask, mlm_input_ids, mlm_labels = (
            _rows(special_tokens_mask, rows), _rows(mlm_input_ids, rows), _rows(mlm_labels, rows)
        )  # fmt: skip
        question_input_ids, question_attention_mask, vqa_labels = (
            _rows(question_input_ids, rows), _rows(question_attention_mask, rows), _rows(vqa_labels, rows)
        )  # fmt: skip
        pixel_values, bool_masked_pos = pixel_values[rows], _rows(bool_masked_pos, rows)
        decoder_input_ids, decoder_attention_mask, captioning_labels = (
            _rows(decoder_input_ids, rows), _rows(decoder_attention_mask, rows), _rows(captioning_labels, rows)
        )  # fmt: skip
        if self.mlm_head is not None:
            if mlm_input_ids is None:
                if special_tokens_mask is None:
                    special_ids = torch.tensor(
                        config.special_token_ids, device=input_ids.device, dtype=input_ids.dtype
                    )
                    special_tokens_mask = torch.isin(aux_ids, special_ids)
                    if aux_mask is not None:
                        special_tokens_mask |= aux_mask == 0
                mlm_input_ids, mlm_labels = mask_tokens(
                    aux_ids,
                    special_tokens_mask.bool(),
                    config.mask_token_id,
                    config.text_config.vocab_size,
                    config.mlm_probability,
                )
            elif mlm_labels is None:
                raise ValueError("mlm_input_ids were given without mlm_labels (original ids at masked positions).")
            masked_text = self._encode_text(
                mlm_input_ids, aux_mask, aux_types, check_values=not checked
            ).last_hidden_state
            requests["mlm"] = (masked_text, aux_mask, aux_index)
        if self.vqa_head is not None:
            if question_input_ids is None or vqa_labels is None:
                raise ValueError(
                    f"vqa_loss_weight={config.vqa_loss_weight} needs question_input_ids and vqa_labels (one question "
                    "per image); pass them or set vqa_loss_weight=0."
                )
            question = self._encode_text(
                question_input_ids, question_attention_mask, check_values=not checked
            ).last_hidden_state
            requests["vqa"] = (question, question_attention_mask, aux_index)
        fused = self._fuse_requests(images, requests)
        if self.itm_head is not None:
            outputs["itm_logits"] = self.itm_head(fused["itm"].pooler_output, itm_prior)
            losses["itm"] = F.cross_entropy(outputs["itm_logits"].float(), itm_labels, ignore_index=-100)
        if self.mlm_head is not None:
            # the vocabulary projection only where there is a target; the targets' positions are the one host read
            selected = (mlm_labels.reshape(-1) != -100).nonzero().squeeze(1)
            tokens = fused["mlm"].text_last_hidden_state
            outputs["mlm_logits"] = self.mlm_head(tokens.reshape(-1, tokens.shape[-1]).index_select(0, selected))
            losses["mlm"] = masked_language_modeling_loss(
                outputs["mlm_logits"], mlm_labels.reshape(-1).index_select(0, selected)
            )
        if self.vqa_head is not None:
            outputs["vqa_logits"] = self.vqa_head(fused["vqa"].pooler_output)
            losses["vqa"] = vqa_loss(outputs["vqa_logits"], vqa_labels, check_values=not checked)
        if self.mim_decoder is not None:
            num_patches = image.shape[1] - 1
            if bool_masked_pos is None:
                bool_masked_pos = random_patch_mask(
                    aux_image.shape[0], num_patches, config.mim_mask_ratio, image.device
                )
            masked_image = self._encode_image(
                pixel_values, interpolate_pos_encoding, bool_masked_pos=bool_masked_pos
            ).last_hidden_state
            if config.mim_source == "fused":
                masked_image = self.fuse(masked_image, aux_text, aux_mask).image_last_hidden_state
            outputs["mim_logits"] = self.mim_decoder(masked_image, bool_masked_pos)
            losses["mim"] = masked_image_modeling_loss(
                outputs["mim_logits"],
                pixel_values,
                bool_masked_pos,
                config.vision_config.patch_size,
                config.mim_norm_pix_loss,
            )
        if self.text_decoder is not None:
            if decoder_input_ids is None:
                decoder_input_ids, decoder_attention_mask = aux_ids, aux_mask
            if captioning_labels is None:
                captioning_labels = decoder_input_ids
                if decoder_attention_mask is not None:
                    captioning_labels = decoder_input_ids.masked_fill(decoder_attention_mask == 0, -100)
            decoded = self.text_decoder(decoder_input_ids, aux_image, decoder_attention_mask, check_values=not checked)
            outputs["captioning_logits"] = self.lm_head(decoded)
            losses["captioning"] = causal_lm_loss(outputs["captioning_logits"], captioning_labels)
        total = sum(getattr(config, f"{name}_loss_weight") * value for name, value in losses.items())
        return XModalForPreTrainingOutput(
            loss=total if losses else None, **{f"{name}_loss": value for name, value in losses.items()}, **outputs
        )


class XModalForImageClassification(XModalPreTrainedModel):
    """The xmodal image tower with a linear classifier on its pooled output (the first fine-tuning target)."""

    main_input_name = "pixel_values"

    def __init__(self, config: XModalConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = _build_tower(config.vision_config, XModalVisionTransformer, XModalVisionConfig)
        hidden = config.vision_config.hidden_size
        self.classifier = nn.Linear(hidden, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices in
                `[0, config.num_labels)` (float targets for regression / multi-label, following `problem_type`).

        Returns:
            `ImageClassifierOutput` with `loss` (when `labels` are given) and `logits` `(batch_size, num_labels)`.
        """
        _check_pixel_values(pixel_values, getattr(self.config.vision_config, "num_channels", None))
        kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=output_hidden_states, **kwargs)
        logits = self.classifier(_pool(outputs.last_hidden_state, self.config.vision_pooling, is_image=True))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "XModalForConditionalGeneration",
    "XModalForImageClassification",
    "XModalForImageTextRetrieval",
    "XModalForMaskedLM",
    "XModalForPreTraining",
    "XModalForPreTrainingOutput",
    "XModalForVisualQuestionAnswering",
    "XModalFusedPairsModel",
    "XModalFusionOutput",
    "XModalImageTextRetrievalOutput",
    "XModalModel",
    "XModalOutput",
    "XModalPreTrainedModel",
    "causal_lm_loss",
    "contrastive_loss",
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
