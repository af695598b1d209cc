"""Image-text matching (ITM): hard negatives drawn from the global batch in proportion to the contrastive
similarity (ALBEF), the fused inputs of the matching head and its loss.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from xmodal.modeling_base import XModalModel
from xmodal.outputs import XModalFusionOutput


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
    num_anchors: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image-text matching pairs of this process's first K texts and images (the anchors: K = `num_anchors`, or
    all B), with negatives sampled by `_itm_pairs` from the global batch of M = N x B pairs (M = B on one process):

    - `config.itm_sampling="all"` (ALBEF): K positives, K texts with a negative image, K images with a negative text;
    - `"half"` (the UNITER/ViLT budget): K pairs, each kept with probability 1/2, else given a negative image or a
      negative text (1/4 each); a pair with no possible negative stays positive.

    Returns `(texts (n, L, D), attention_mask (n, L), image_index (n,), labels (n,), contrastive_logits (n,))`,
    n = 3K or K, with `image_index` into the global batch's images; labels are 1 for a match, 0 for a negative, -100
    for a negative that could not be drawn; `contrastive_logits` are each pair's (detached), for `XModalITMHead`."""
    batch_size = input_ids.shape[0]
    anchors = batch_size if num_anchors is None else min(num_anchors, batch_size)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    index = global_batch.rank * batch_size + torch.arange(anchors, device=input_ids.device)
    with torch.no_grad():
        keys = _caption_keys(input_ids, attention_mask)
        all_keys = global_batch.gather(keys)
        allowed = all_keys[None, :] != keys[:anchors, None]  # (K, M)
        all_image_embeds, all_text_embeds = (
            global_batch.gather(image_embeds.detach()),
            global_batch.gather(text_embeds.detach()),
        )
        text_to_image = model.logits(all_image_embeds, text_embeds[:anchors])
        image_to_text = model.logits(image_embeds[:anchors], all_text_embeds).t()
    all_texts, all_masks = global_batch.gather(text_hidden_states), global_batch.gather(attention_mask)
    neg_image, neg_text, has_negative = _itm_pairs(
        text_to_image, image_to_text, allowed, model.config.itm_hard_negatives
    )
    ones = torch.ones(anchors, dtype=torch.long, device=input_ids.device)
    if model.config.itm_sampling == "half":
        with torch.no_grad():
            draw = torch.rand(anchors, device=input_ids.device)
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
    return all_texts.index_select(0, text_index), all_masks.index_select(0, text_index), image_index, labels, prior


def _itm_loss(
    model: XModalModel,
    image_hidden_states: torch.Tensor,
    text_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, XModalFusionOutput]:
    """Image-text matching (ALBEF) from tower outputs `(B, L, D)` and embeddings `(B, projection_dim)`. Returns
    `(loss, itm_logits (N, 2), the fusion output of the N pairs)`, N = B or 3B (`config.itm_sampling`)."""
    texts, masks, image_index, labels, prior = _itm_inputs(
        model, text_hidden_states, attention_mask, input_ids, image_embeds, text_embeds, _LocalBatch()
    )
    # the indices are built here: the fusion module directly, without `fuse`'s check (a device sync)
    fused = model.cross_model(
        image_hidden_states,
        texts,
        masks,
        image_index,
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
    )
    itm_logits = model.itm_head(fused.pooler_output, prior)
    return F.cross_entropy(itm_logits.float(), labels, ignore_index=-100), itm_logits, fused


__all__ = [
    "BatchGatherer",
]
