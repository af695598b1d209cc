"""The `ModelOutput` dataclasses the xmodal models return.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput


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


__all__ = [
    "XModalForPreTrainingOutput",
    "XModalFusionOutput",
    "XModalImageTextRetrievalOutput",
    "XModalOutput",
]
