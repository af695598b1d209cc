"""The task models for transfer: retrieval with ITM re-ranking, masked language modelling, visual question
answering, captioning (`generate`) and image classification.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from xmodal.checks import _check_pairs
from xmodal.configuration.configuration_xmodal import XModalConfig, XModalTextConfig, XModalVisionConfig
from xmodal.heads import XModalITMHead, XModalMLMHead, XModalTextDecoder, XModalVQAHead
from xmodal.losses import causal_lm_loss, masked_language_modeling_loss, vqa_loss
from xmodal.matching import _itm_loss
from xmodal.modeling_base import XModalModel, XModalPreTrainedModel, _build_fusion, _require_stream
from xmodal.outputs import (
    XModalForConditionalGenerationOutput,
    XModalFusedPairsOutput,
    XModalFusionOutput,
    XModalImageTextRetrievalOutput,
)
from xmodal.towers import XModalTextTransformer, XModalVisionTransformer, _build_tower, _pool


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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> XModalImageTextRetrievalOutput:
        r"""Scores every text against every image.

        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`).
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, num_channels, height, width)`).
            attention_mask (`torch.Tensor` of shape `(text_batch_size, sequence_length)`, *optional*).
            return_loss (`bool`, *optional*): contrastive + ITM (hard negatives) loss over the pairs (i, i).
            rerank_top_k (`int`, *optional*): re-rank each text's top-k images with the ITM head
                (`itm_scores_per_text`); `config.itm_rerank_top_k` is a sensible value.
            output_attentions, output_hidden_states (`bool`, *optional*, default the config's): the towers' hidden
                states and attention weights (`vision_model_output`, `text_model_output`), and with `return_loss` the
                fusion module's on the ITM pairs (`multimodal_output`).

        Returns:
            [`XModalImageTextRetrievalOutput`].
        """
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        inspected = output_attentions or output_hidden_states
        image = self._encode_image(pixel_values, interpolate_pos_encoding, **flags)
        text = self._encode_text(input_ids, attention_mask, token_type_ids, **flags)
        image_embeds, text_embeds = self._embeds(image.last_hidden_state, text.last_hidden_state, attention_mask)
        logits_per_text = self.logits(image_embeds, text_embeds)
        loss = itm_logits = itm_scores = fused = None
        if return_loss:
            _check_pairs(logits_per_text)
            itm, itm_logits, fused = _itm_loss(
                self,
                image.last_hidden_state,
                text.last_hidden_state,
                attention_mask,
                input_ids,
                image_embeds,
                text_embeds,
                **flags,
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
            vision_model_output=image if inspected else None,
            text_model_output=text if inspected else None,
            multimodal_output=fused if inspected else None,
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

    def _fused_outputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        interpolate_pos_encoding: bool,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
    ) -> tuple[XModalFusionOutput, dict[str, Any]]:
        """The fusion output of image i with text i, and the `*_output` fields of [`XModalFusedPairsOutput`] (the
        towers' and the fusion module's outputs when hidden states or attentions are asked for)."""
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        image, text, fused = self._fused_pairs(
            input_ids,
            pixel_values,
            attention_mask,
            token_type_ids,
            interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        if not (output_attentions or output_hidden_states):
            return fused, {}
        return fused, {"vision_model_output": image, "text_model_output": text, "multimodal_output": fused}


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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> XModalFusedPairsOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the (masked) text, e.g. from
                `xmodal.mask_tokens`.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): image i goes
                with text i.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): original ids at masked
                positions, -100 elsewhere.
            output_attentions, output_hidden_states (`bool`, *optional*, default the config's): the towers' and the
                fusion module's hidden states and attention weights (`vision_model_output`, `text_model_output`,
                `multimodal_output`).

        Returns:
            [`XModalFusedPairsOutput`] with `loss` (when `labels` are given) and `logits` `(batch_size,
            sequence_length, vocab_size)`.
        """
        fused, parts = self._fused_outputs(
            input_ids,
            pixel_values,
            attention_mask,
            token_type_ids,
            interpolate_pos_encoding,
            output_attentions,
            output_hidden_states,
        )
        logits = self.mlm_head(fused.text_last_hidden_state)
        loss = masked_language_modeling_loss(logits, labels) if labels is not None else None
        return XModalFusedPairsOutput(loss=loss, logits=logits, **parts)


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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> XModalFusedPairsOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the questions.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            labels (`torch.FloatTensor` of shape `(batch_size, num_labels)` soft scores, or `torch.LongTensor` of
                shape `(batch_size,)` answer indices, *optional*).
            output_attentions, output_hidden_states (`bool`, *optional*, default the config's): as in
                [`XModalForMaskedLM`].

        Returns:
            [`XModalFusedPairsOutput`] with `loss` (when `labels` are given) and `logits` `(batch_size, num_labels)`.
        """
        fused, parts = self._fused_outputs(
            input_ids,
            pixel_values,
            attention_mask,
            token_type_ids,
            interpolate_pos_encoding,
            output_attentions,
            output_hidden_states,
        )
        logits = self.vqa_head(fused.pooler_output)
        loss = vqa_loss(logits, labels) if labels is not None else None
        return XModalFusedPairsOutput(loss=loss, logits=logits, **parts)


class XModalForConditionalGeneration(XModalPreTrainedModel, GenerationMixin):
    """Captioning and generative VQA: the image tower and a text decoder that cross-attends to the image tokens,
    with `generate()` (greedy, beam search, sampling) through transformers' GenerationMixin and a KV cache.

    Example:

    ```python
    >>> captions = model.generate(pixel_values=pixel_values, max_new_tokens=20, num_beams=3)
    >>> processor.batch_decode(captions, skip_special_tokens=True)
    ```
    For VQA, pass the question (without its final [SEP]) as `input_ids`: the answer is generated after it.

    It has no text tower or fusion module: its outputs hold the image tower's (`image_embeds`, and
    `vision_model_output` when this call encodes the image, not in the cached generation steps) and the decoder's.
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

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> XModalForConditionalGenerationOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): the images (the
                main input, first as in BLIP's `forward`); needed unless `encoder_hidden_states` (the image tower's
                tokens) are given.
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): decoder tokens starting with
                `decoder_config.bos_token_id` ([CLS]); a tokenized caption is already in this form.
            attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*).
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): usually `input_ids`
                with padding (and any prompt) set to -100; position t is trained to predict label t + 1.
            cache (`Cache`, *optional*): the decoder's KV cache (generation); the former name `past_key_values` is
                accepted, with a deprecation warning.
            use_cache (`bool`, *optional*): create and return a cache.
            output_attentions, output_hidden_states (`bool`, *optional*, default the config's): the decoder's
                hidden states, self- and cross-attention weights, and the image tower's (`vision_model_output`, when
                this call encodes the image).
            **kwargs: generation bookkeeping flags passed by GenerationMixin (unused).

        Returns:
            [`XModalForConditionalGenerationOutput`] with `loss`, `logits` `(batch_size, sequence_length,
            vocab_size)`, `cache` and the image tokens `image_embeds`.
        """
        if input_ids is None:
            raise ValueError("input_ids (decoder tokens, starting with the BOS/[CLS] id) are required.")
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        vision_output = None
        if encoder_hidden_states is None:
            vision_output = self._encode_image(pixel_values, interpolate_pos_encoding, **flags)
            encoder_hidden_states = vision_output.last_hidden_state
        if use_cache and cache is None:
            cache = DynamicCache()
        decoded = self.text_decoder(input_ids, encoder_hidden_states, attention_mask, position_ids, cache, **flags)
        logits = self.lm_head(decoded.last_hidden_state)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return XModalForConditionalGenerationOutput(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            hidden_states=decoded.hidden_states,
            attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions,
            image_embeds=encoder_hidden_states,
            vision_model_output=vision_output if output_attentions or output_hidden_states else None,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        token_type_ids: torch.LongTensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        r"""Captions (or answers, with a question prompt in `input_ids`) for a batch of images. The image is encoded
        once; every decoding step reuses its tokens and the KV cache.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*): a prompt starting
                with the BOS id (default: BOS alone); left-pad prompts of different lengths. A prompt as the
                processor tokenizes it, ending with the EOS ([SEP]) token in every row, is continued after its last
                word (the final EOS is dropped): this is how the `image-text-to-text` pipeline calls it.
            token_type_ids: accepted because the processor returns them, and ignored (the decoder has no segments).
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
        elif input_ids.shape[1] > 1 and bool((input_ids[:, -1] == self.generation_config.eos_token_id).all()):
            input_ids = input_ids[:, :-1]
            attention_mask = attention_mask[:, :-1] if attention_mask is not None else None
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


class XModalForImageClassification(XModalPreTrainedModel):
    """The xmodal image tower with a linear classifier on its pooled output (the first fine-tuning target).

    Of transformers' conventions, `resize_token_embeddings` does not fit: the model has no token embeddings (no text
    tower or decoder), so it raises `NotImplementedError`, as transformers' `get_input_embeddings` does."""

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
        output_attentions: bool | None = None,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices in
                `[0, config.num_labels)` (float targets for regression / multi-label, following `problem_type`).
            output_hidden_states, output_attentions (`bool`, *optional*, default the config's): the image tower's
                hidden states (`vision_config.num_hidden_layers + 1` tensors `(batch_size, num_tokens, hidden_size)`)
                and attention weights per layer, as `CLIPForImageClassification`.

        Returns:
            `ImageClassifierOutput` with `loss` (when `labels` are given), `logits` `(batch_size, num_labels)`,
            `hidden_states` and `attentions`.
        """
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        outputs = self._encode_image(
            pixel_values, interpolate_pos_encoding, output_hidden_states, output_attentions=output_attentions
        )
        logits = self.classifier(_pool(outputs.last_hidden_state, self.config.vision_pooling, is_image=True))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "XModalForConditionalGeneration",
    "XModalForImageClassification",
    "XModalForImageTextRetrieval",
    "XModalForMaskedLM",
    "XModalForVisualQuestionAnswering",
    "XModalFusedPairsModel",
]
