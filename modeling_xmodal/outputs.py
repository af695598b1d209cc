"""The `ModelOutput` dataclasses the xmodal models return.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPooling,
    CausalLMOutputWithCrossAttentions,
)
from transformers.utils import ModelOutput


def _nested_to_tuple(output: ModelOutput) -> tuple[Any, ...]:
    """`output.to_tuple()` with its nested outputs (the per-tower `*_output` fields) as tuples too, as CLIP's."""
    return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in output.values())


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
            `pooler_output` is the projected (unnormalised) embedding, their `hidden_states` / `attentions` the
            tower's (with `output_hidden_states` / `output_attentions`).
        multimodal_output (`XModalFusionOutput`, *optional*, with `return_multimodal_output=True`): the fusion
            module's output for the pairs (image i with text i).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    multimodal_output: XModalFusionOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return _nested_to_tuple(self)


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
        text_hidden_states, image_hidden_states (`tuple(torch.FloatTensor)`, *optional*, with
            `output_hidden_states=True`, for each stream that has fusion layers): `num_hidden_layers + 1` tensors of
            shape `(batch_size, length, cross_hidden_size)`, the stream's projected input, then each layer's output
            (before the final LayerNorm).
        text_attentions, image_attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions=True`):
            each layer's self-attention weights of the stream, `(batch_size, num_heads, length, length)`.
        text_cross_attentions, image_cross_attentions (`tuple(torch.FloatTensor)`, *optional*, with
            `output_attentions=True`): each layer's cross-attention weights of the stream's queries over the other
            modality's tokens, `(batch_size, num_heads, length, other_length)`.
    """

    pooler_output: torch.FloatTensor | None = None
    text_last_hidden_state: torch.FloatTensor | None = None
    image_last_hidden_state: torch.FloatTensor | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


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
        vision_model_output, text_model_output (`BaseModelOutput`, *optional*, with `output_hidden_states` or
            `output_attentions`): the towers' outputs on the pairs, with their `hidden_states` / `attentions`.
        multimodal_output (`XModalFusionOutput`, *optional*, likewise, with ITM and `return_loss`): the fusion
            module's output on the ITM pairs (the rows of `itm_logits`), its text stream's hidden states and
            attentions included.
        multimodal_masked_output (`XModalFusionOutput`, *optional*, likewise, with MLM and `return_loss`): the
            fusion module's output on the masked captions with their images (the pairs MLM sees), as FLAVA's.
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
    vision_model_output: BaseModelOutput | None = None
    text_model_output: BaseModelOutput | None = None
    multimodal_output: XModalFusionOutput | None = None
    multimodal_masked_output: XModalFusionOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return _nested_to_tuple(self)


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
        vision_model_output, text_model_output (`BaseModelOutput`, *optional*, with `output_hidden_states` or
            `output_attentions`): the towers' outputs, with their `hidden_states` / `attentions`.
        multimodal_output (`XModalFusionOutput`, *optional*, likewise, with `return_loss`): the fusion module's output
            on the ITM pairs (the rows of `itm_logits`).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_scores_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutput | None = None
    text_model_output: BaseModelOutput | None = None
    multimodal_output: XModalFusionOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return _nested_to_tuple(self)


@dataclass
class XModalFusedPairsOutput(ModelOutput):
    r"""Output of the heads on fused image-text pairs: [`XModalForMaskedLM`] and [`XModalForVisualQuestionAnswering`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, when `labels` are given).
        logits (`torch.FloatTensor`): `(batch_size, sequence_length, vocab_size)` token logits (masked language
            modelling) or `(batch_size, num_labels)` answer logits (VQA).
        vision_model_output, text_model_output (`BaseModelOutput`, *optional*, with `output_hidden_states` or
            `output_attentions`): the towers' outputs, with their `hidden_states` / `attentions`.
        multimodal_output (`XModalFusionOutput`, *optional*, likewise): the fusion module's, with each fused stream's
            hidden states, self- and cross-attentions; the head reads its fused text tokens (MLM) or its pooled
            output (VQA).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutput | None = None
    text_model_output: BaseModelOutput | None = None
    multimodal_output: XModalFusionOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return _nested_to_tuple(self)


@dataclass
class XModalForConditionalGenerationOutput(CausalLMOutputWithCrossAttentions):
    r"""Output of [`XModalForConditionalGeneration`]: the decoder's, as transformers' `CausalLMOutputWithCrossAttentions`,
    and the image it reads (BLIP's `image_embeds`).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, when `labels` are given): the captioning loss.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
        cache (`Cache`, *optional*, with `use_cache=True`): the decoder's KV cache.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states=True`): the decoder's
            embeddings and each layer's output, `(batch_size, sequence_length, decoder_hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions=True`): the decoder's causal
            self-attention weights per layer, `(batch_size, num_heads, sequence_length, past + sequence_length)`.
        cross_attentions (`tuple(torch.FloatTensor)`, *optional*, likewise): the decoder's attention over the image
            tokens per layer, `(batch_size, num_heads, sequence_length, num_image_tokens)`.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_image_tokens, vision_hidden_size)`): the image
            tower's tokens the decoder attends to.
        vision_model_output (`BaseModelOutput`, *optional*, with `output_hidden_states` or `output_attentions`, when
            the image was encoded by this call): the image tower's output, with its `hidden_states` / `attentions`.
    """

    image_embeds: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return _nested_to_tuple(self)


__all__ = [
    "XModalForConditionalGenerationOutput",
    "XModalForPreTrainingOutput",
    "XModalFusedPairsOutput",
    "XModalFusionOutput",
    "XModalImageTextRetrievalOutput",
    "XModalOutput",
]
