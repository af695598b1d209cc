"""`XModalForPreTraining`: every pretraining objective in one model, with per-objective losses.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, can_return_tuple

from xmodal.checks import _check_pairs, _check_ranges, _check_text_inputs, _text_id_ranges
from xmodal.configuration.configuration_xmodal import LOSS_WEIGHT_FIELDS, XModalVisionConfig
from xmodal.heads import (
    XModalITMHead,
    XModalMIMDecoder,
    XModalMLMHead,
    XModalMomentumEncoder,
    XModalTextDecoder,
    XModalVQAHead,
)
from xmodal.losses import (
    _vqa_label_ranges,
    causal_lm_loss,
    mask_tokens,
    masked_image_modeling_loss,
    masked_language_modeling_loss,
    nt_xent_loss,
    random_patch_mask,
    vqa_loss,
)
from xmodal.matching import BatchGatherer, _itm_inputs, _LocalBatch, _rows
from xmodal.modeling_base import XModalModel, _require_stream
from xmodal.outputs import XModalForPreTrainingOutput, XModalFusionOutput
from xmodal.towers import _pool


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
            self.mim_decoder = XModalMIMDecoder.from_model_config(config, width)
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

    @property
    def pretraining_objectives(self) -> tuple[str, ...]:
        """The objectives this model trains (those with `config.<objective>_loss_weight > 0`), in config order."""
        names = (field.removesuffix("_loss_weight") for field in LOSS_WEIGHT_FIELDS)
        return tuple(name for name in names if getattr(self.config, f"{name}_loss_weight") > 0)

    def _active_objectives(self, objectives: Collection[str] | None) -> set[str]:
        """`forward`'s `objectives` checked against the configured ones (all of them when None)."""
        configured = self.pretraining_objectives
        if objectives is None:
            return set(configured)
        unknown = sorted(set(objectives) - set(configured))
        if unknown or isinstance(objectives, str):
            raise ValueError(
                f"objectives must be a collection of this model's objectives {list(configured)} (those with a "
                f"*_loss_weight > 0), got {objectives!r}."
            )
        return set(objectives)

    def _fuse_requests(
        self,
        image: torch.Tensor,
        requests: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> dict[str, XModalFusionOutput]:
        """Fuses `{name: (text tokens (N, L, D), mask (N, L) or None, image_index (N,))}` with the `(B, Li, Dv)` image
        tokens: requests of one text length go through the fusion module together (their hidden states and
        attentions, when asked, are split back per request)."""
        by_length: dict[int | str, list[str]] = {}
        inspected_outputs = output_hidden_states or output_attentions
        for name, (texts, _, _) in requests.items():
            # asked for hidden states or attentions, each request runs alone, so that they are its computation's
            by_length.setdefault(name if inspected_outputs else texts.shape[1], []).append(name)
        fused: dict[str, XModalFusionOutput] = {}
        for names in by_length.values():
            parts = [requests[name] for name in names]
            masks = [
                mask if mask is not None else torch.ones(texts.shape[:2], device=texts.device, dtype=torch.long)
                for texts, mask, _ in parts
            ]
            # the indices are the model's own: the fusion module directly, without `fuse`'s check (a device sync)
            out = self.cross_model(
                image,
                torch.cat([texts for texts, _, _ in parts]),
                torch.cat(masks),
                torch.cat([i for *_, i in parts]),
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )
            if len(names) == 1:
                fused[names[0]] = out
                continue
            sizes = [texts.shape[0] for texts, _, _ in parts]
            # per layer, the chunks of each request
            inspected = {
                key: [tensor.split(sizes) for tensor in value]
                for key, value in out.items()
                if key.startswith("text_") and key != "text_last_hidden_state"
            }
            for index, (name, pooled, tokens) in enumerate(
                zip(names, out.pooler_output.split(sizes), out.text_last_hidden_state.split(sizes), strict=True)
            ):
                fused[name] = XModalFusionOutput(
                    pooler_output=pooled,
                    text_last_hidden_state=tokens,
                    **{key: tuple(chunks[index] for chunks in value) for key, value in inspected.items()},
                )
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
        negative_embeds: torch.Tensor | None = None,
        check_values: bool = True,
    ) -> torch.Tensor:
        """The cross-modal loss averaged over every (image view, text view) combination, plus
        `multiview_loss_weight` x the NT-Xent between the two views of each modality that has two (the second
        view's ids checked unless `check_values=False`). The hard negative captions `negative_embeds` `(K, D)`
        join the first views' loss."""
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
            negative_logits = None if negative_embeds is None else self.logits(image_embeds, negative_embeds).t()
            first = self.contrastive_objective(logits_per_text, negative_logits)
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
        negative_input_ids: torch.LongTensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        objectives: Collection[str] | None = None,
    ) -> XModalForPreTrainingOutput:
        r"""One multi-task pretraining step on image-text pairs (image i with text i).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the captions.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*).
            return_loss (`bool`, *optional*): compute the objectives; otherwise only the contrastive logits.
            second_view_pixel_values, second_view_input_ids, second_view_attention_mask (*optional*): a second
                augmented view of the same pairs (`xmodal.training.make_views`) for multi-view contrastive learning.
            negative_input_ids, negative_attention_mask (`(num_negatives, negative_length)`, *optional*): hard
                negative captions that match no image of the batch (e.g. a caption with one attribute word swapped,
                `xmodal.training.data.negatives.WordSwapNegatives`; NegCLIP), extra texts in the contrastive loss's
                image->text direction; not combinable with the momentum queue.
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
            objectives (*optional*): the objectives whose losses this call computes, a subset of the configured ones
                (`pretraining_objectives`); the others skip their compute and their heads get no gradient (e.g.
                the auxiliary objectives on one step in N only, `xmodal pretrain --auxiliary_every N`). Default: all.
            output_attentions, output_hidden_states (`bool`, *optional*, default the config's): the towers' hidden
                states and attention weights on the pairs (`vision_model_output`, `text_model_output`) and the fusion
                module's on the ITM pairs (`multimodal_output`) and on the masked captions
                (`multimodal_masked_output`), as FLAVA's pretraining output.

        Returns:
            [`XModalForPreTrainingOutput`].
        """
        config = self.config
        active = self._active_objectives(objectives) if return_loss else set()
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        global_batch = global_batch if global_batch is not None else _LocalBatch()
        checked = self._check_id_ranges(
            input_ids, attention_mask, token_type_ids, second_view_input_ids, second_view_attention_mask,
            mlm_input_ids, question_input_ids, question_attention_mask, decoder_input_ids, vqa_labels, return_loss,
        )  # fmt: skip
        vision_output = self._encode_image(pixel_values, interpolate_pos_encoding, **flags)
        text_output = self._encode_text(input_ids, attention_mask, token_type_ids, check_values=not checked, **flags)
        image, text = vision_output.last_hidden_state, text_output.last_hidden_state
        image_embeds, text_embeds = self._embeds(image, text, attention_mask)
        logits_per_text = self.logits(image_embeds, text_embeds)
        outputs: dict[str, torch.Tensor | ModelOutput] = {
            "logits_per_image": logits_per_text.t(),
            "logits_per_text": logits_per_text,
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
        }
        if output_attentions or output_hidden_states:
            outputs.update(vision_model_output=vision_output, text_model_output=text_output)
        if not return_loss:
            return XModalForPreTrainingOutput(**outputs)
        _check_pairs(logits_per_text)
        losses: dict[str, torch.Tensor] = {}
        negative_embeds = None
        if negative_input_ids is not None and "contrastive" in active:
            if self.momentum_encoder is not None:
                raise ValueError(
                    "negative_input_ids (hard negative captions) cannot be combined with the momentum queue."
                )
            negative = self._encode_text(negative_input_ids, negative_attention_mask).last_hidden_state
            pooled = _pool(negative, config.text_pooling, negative_attention_mask)
            negative_embeds = F.normalize(self.text_projection(pooled), dim=-1)  # (K, projection_dim)
        if "contrastive" in active and contrastive_loss_fn is not None:
            if (
                self.momentum_encoder is not None
                or second_view_pixel_values is not None
                or (second_view_input_ids is not None)
            ):
                raise ValueError("contrastive_loss_fn cannot be combined with the momentum queue or second views.")
            negatives = {} if negative_embeds is None else {"negative_text_embeds": negative_embeds}
            losses["contrastive"] = contrastive_loss_fn(
                image_embeds, text_embeds, self.clamped_logit_scale(), **negatives
            )
        elif "contrastive" in active:
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
                negative_embeds,
                check_values=not checked,
            )
        # Fusion requests of the ITM, MLM and VQA objectives; those of equal text length share one fusion call, in
        # which each image's cross-attention keys/values are computed once.
        # With ITM, the fused images are the global batch's (its negatives may come from any process).
        requests: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        images, batch_index = image, torch.arange(input_ids.shape[0], device=input_ids.device)
        if "itm" in active:
            images, batch_index = global_batch.gather(image), batch_index + global_batch.rank * input_ids.shape[0]
            itm_texts, itm_masks, itm_index, itm_labels, itm_prior = _itm_inputs(
                self, text, attention_mask, input_ids, image_embeds, text_embeds, global_batch,
                config.auxiliary_batch_size,
            )  # fmt: skip
            requests["itm"] = (itm_texts, itm_masks, itm_index)
        # MLM, VQA, MIM and captioning see the first `auxiliary_batch_size` pairs only, and so do ITM's anchors
        # (their cost grows with the pairs they see); the contrastive loss and ITM's negatives keep every pair
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
        if "mlm" in active:
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
        if "vqa" in active:
            if question_input_ids is None or vqa_labels is None:
                raise ValueError(
                    f"vqa_loss_weight={config.vqa_loss_weight} needs question_input_ids and vqa_labels (one question "
                    "per image); pass them or set vqa_loss_weight=0."
                )
            question = self._encode_text(
                question_input_ids, question_attention_mask, check_values=not checked
            ).last_hidden_state
            requests["vqa"] = (question, question_attention_mask, aux_index)
        fused = self._fuse_requests(images, requests, **flags)
        if output_attentions or output_hidden_states:
            for name, key in (("itm", "multimodal_output"), ("mlm", "multimodal_masked_output")):
                if name in fused:
                    outputs[key] = fused[name]
        if "itm" in active:
            outputs["itm_logits"] = self.itm_head(fused["itm"].pooler_output, itm_prior)
            losses["itm"] = F.cross_entropy(outputs["itm_logits"].float(), itm_labels, ignore_index=-100)
        if "mlm" in active:
            # the vocabulary projection only where there is a target; the targets' positions are the one host read
            selected = (mlm_labels.reshape(-1) != -100).nonzero().squeeze(1)
            tokens = fused["mlm"].text_last_hidden_state
            outputs["mlm_logits"] = self.mlm_head(tokens.reshape(-1, tokens.shape[-1]).index_select(0, selected))
            losses["mlm"] = masked_language_modeling_loss(
                outputs["mlm_logits"], mlm_labels.reshape(-1).index_select(0, selected)
            )
        if "vqa" in active:
            outputs["vqa_logits"] = self.vqa_head(fused["vqa"].pooler_output)
            losses["vqa"] = vqa_loss(outputs["vqa_logits"], vqa_labels, check_values=not checked)
        if "mim" in active:
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
        if "captioning" in active:
            if decoder_input_ids is None:
                decoder_input_ids, decoder_attention_mask = aux_ids, aux_mask
            if captioning_labels is None:
                captioning_labels = decoder_input_ids
                if decoder_attention_mask is not None:
                    captioning_labels = decoder_input_ids.masked_fill(decoder_attention_mask == 0, -100)
            decoded = self.text_decoder(
                decoder_input_ids, aux_image, decoder_attention_mask, check_values=not checked
            ).last_hidden_state
            outputs["captioning_logits"] = self.lm_head(decoded)
            losses["captioning"] = causal_lm_loss(outputs["captioning_logits"], captioning_labels)
        total = sum(getattr(config, f"{name}_loss_weight") * value for name, value in losses.items())
        return XModalForPreTrainingOutput(
            loss=total if losses else None, **{f"{name}_loss": value for name, value in losses.items()}, **outputs
        )


__all__ = [
    "XModalForPreTraining",
]
