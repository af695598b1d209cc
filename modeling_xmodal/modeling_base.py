"""The base class of every xmodal model (`XModalPreTrainedModel`: initialisation, loading policy, transformers
integration) and the dual encoder with optional fusion, `XModalModel`.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import can_return_tuple, logging

from xmodal.checks import (
    _check_pairs,
    _check_pixel_values,
    _check_ranges,
    _check_text_inputs,
    _damaged_weights_file,
    _Range,
    _refuse_pickle_only,
    _weights_source,
)
from xmodal.configuration.configuration_xmodal import XModalConfig, XModalTextConfig, XModalVisionConfig
from xmodal.conversion import clip_to_xmodal_config, clip_to_xmodal_state_dict
from xmodal.heads import XModalFusionModel, XModalITMHead, XModalMLMHead, XModalMomentumEncoder
from xmodal.losses import contrastive_loss, contrastive_loss_with_negative_texts, siglip_loss
from xmodal.outputs import XModalFusionOutput, XModalOutput
from xmodal.towers import XModalTextTransformer, XModalVisionTransformer, _build_tower, _pool

logger = logging.get_logger(__name__)


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

    @property
    def xmodal(self) -> XModalPreTrainedModel:
        """The base model, the attribute `base_model_prefix` names: the model itself. Every head holds the shared
        parts (`vision_model`, `text_model`, `cross_model`, the projections) at its top level rather than in a nested
        base model, so that any head loads any other's checkpoint key for key; tools that reach the base model with
        `getattr(model, model.base_model_prefix)` (or `model.base_model`) get the model and its towers."""
        return self

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
        - Missing weights follow transformers' rules: tied weights are re-tied, and any other weight the checkpoint
          lacks (a new head, a fusion module added by a config override, the text tower of a checkpoint saved by a
          head without one, e.g. [`XModalForImageClassification`], or a tower left out of a partial save) is
          initialised and listed in transformers' load report (`output_loading_info=True`, and logged).

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
        return (model, info) if output_loading_info else model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XModalMLMHead):
            init.zeros_(module.decoder.bias)
        elif isinstance(module, XModalITMHead) and module.prior_weight is not None:
            init.constant_(module.prior_weight, self.config.itm_contrastive_prior)
        elif isinstance(module, XModalMomentumEncoder):
            for queue in (module.image_queue, module.text_queue):
                init.copy_(queue, F.normalize(torch.randn(queue.shape), dim=-1))
            init.zeros_(module.queue_ptr)
            init.zeros_(module.initialized)
        if isinstance(module, XModalModel):
            # the towers (sub-models) initialise themselves, CLIP's scheme included; here the projections
            for projection, tower in (
                (module.visual_projection, self.config.vision_config),
                (module.text_projection, self.config.text_config),
            ):
                if getattr(tower, "initialization", "normal") == "clip":
                    init.normal_(projection.weight, std=tower.hidden_size**-0.5)
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
        head, the decoder's embeddings and LM head, tied or not: they share one tokenizer), keeps the ties and updates
        `text_config.vocab_size` and `decoder_config.vocab_size`. Returns the first resized embedding.

        Raises:
            NotImplementedError: the model has no token embeddings ([`XModalForImageClassification`]), as
                transformers' `get_input_embeddings` does.
        """
        self._main_vocabulary()  # raises for a model without one
        resized = []
        for owner, name, head_owner, head_name, _ in self._vocabularies():
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
            resized.append(embeddings)
        # one tokenizer: both vocabularies are its size, also in a head without one of them (transformers reads
        # `config.get_text_config().vocab_size`)
        for config in (self.config.text_config, self.config.decoder_config):
            config.vocab_size = resized[0].num_embeddings
        self.tie_weights()
        return resized[0]

    def _encode_image(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        bool_masked_pos: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        _check_pixel_values(pixel_values, getattr(self.config.vision_config, "num_channels", None))
        kwargs: dict[str, Any] = {"output_hidden_states": output_hidden_states}
        if output_attentions:
            kwargs["output_attentions"] = True
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
        output_attentions: bool = False,
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
            "output_attentions": output_attentions or None,
        }
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        return self.text_model(attention_mask=attention_mask, output_hidden_states=output_hidden_states, **kwargs)

    def _output_flags(self, output_attentions: bool | None, output_hidden_states: bool | None) -> tuple[bool, bool]:
        """`output_attentions` and `output_hidden_states`, each defaulting to the config's (as transformers does)."""
        return (
            bool(self.config.output_attentions if output_attentions is None else output_attentions),
            bool(self.config.output_hidden_states if output_hidden_states is None else output_hidden_states),
        )

    def fuse(
        self,
        image_hidden_states: torch.Tensor,
        text_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> XModalFusionOutput:
        """Runs the fusion module on tower outputs already computed (so objectives can share one tower pass).

        Args:
            image_hidden_states (`torch.FloatTensor` of shape `(num_images, num_image_tokens, vision_hidden_size)`).
            text_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): text padding mask.
            image_index (`torch.LongTensor` of shape `(batch_size,)`, *optional*): the image of each text (default:
                image i with text i, `num_images == batch_size`); an image used by several pairs is projected once.
            output_hidden_states, output_attentions (`bool`): return each fused stream's hidden states and self-
                and cross-attention weights (see [`XModalFusionOutput`]).
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
        return self.cross_model(
            image_hidden_states,
            text_hidden_states,
            attention_mask,
            image_index,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

    def _fused_pairs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        interpolate_pos_encoding: bool,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[BaseModelOutput, BaseModelOutput, XModalFusionOutput]:
        """The image tower's, the text tower's and the fusion module's outputs for image i with text i."""
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        image = self._encode_image(pixel_values, interpolate_pos_encoding, **flags)
        text = self._encode_text(input_ids, attention_mask, token_type_ids, **flags)
        return image, text, self.fuse(image.last_hidden_state, text.last_hidden_state, attention_mask, **flags)


class XModalModel(XModalPreTrainedModel):
    """The xmodal model: image and text towers, a contrastive projection with a learnable temperature, and a
    cross-modal fusion module.

    `forward` gives image-text similarity logits (and the contrastive loss with `return_loss=True`);
    `get_image_features` / `get_text_features` give projected embeddings; `get_multimodal_features` gives the
    fused representation of image-text pairs.

    Its loss is CLIP's contrastive loss, which does not read the fusion module: `forward` runs the fusion module only
    with `return_multimodal_output=True` (FLAVA's `multimodal_output`), so a training step trains the fusion module
    only through a loss on that output (or in a head, e.g. [`XModalForPreTraining`]); by default the contrastive
    forward costs what CLIP's does.
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
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        r"""Projected image embeddings.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            interpolate_pos_encoding (`bool`): interpolate the position embeddings for another resolution.
            output_hidden_states (`bool`, *optional*, default `config.output_hidden_states`): return the tower's
                hidden states, the embeddings then each layer's output, `vision_config.num_hidden_layers + 1`
                tensors of shape `(batch_size, num_tokens, hidden_size)`, as CLIP.
            output_attentions (`bool`, *optional*, default `config.output_attentions`): return each layer's
                attention weights `(batch_size, num_heads, num_tokens, num_tokens)` (eager attention computes them;
                sdpa does not, and warns).

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` `(batch_size, projection_dim)` is the projected,
            unnormalised image embedding and `last_hidden_state` `(batch_size, num_tokens, hidden_size)` the tower's.
        """
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        outputs = self._encode_image(
            pixel_values, interpolate_pos_encoding, output_hidden_states, output_attentions=output_attentions
        )
        pooled = _pool(outputs.last_hidden_state, self.config.vision_pooling, is_image=True)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.visual_projection(pooled),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
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
            output_hidden_states, output_attentions (`bool`, *optional*, default the config's): the tower's hidden
                states (`text_config.num_hidden_layers + 1` tensors `(batch_size, sequence_length, hidden_size)`) and
                attention weights (`(batch_size, num_heads, sequence_length, sequence_length)` per layer), as in
                `get_image_features`.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` `(batch_size, projection_dim)` is the projected,
            unnormalised text embedding.
        """
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        outputs = self._encode_text(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            output_hidden_states,
            inputs_embeds,
            output_attentions=output_attentions,
        )
        pooled = _pool(outputs.last_hidden_state, self.config.text_pooling, attention_mask)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.text_projection(pooled),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @can_return_tuple
    def get_multimodal_features(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> XModalFusionOutput:
        r"""The fused representation of image-text pairs (image i with text i).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*).
            output_hidden_states, output_attentions (`bool`, *optional*, default the config's): the fusion
                module's hidden states and attention weights per stream (see [`XModalFusionOutput`]).

        Returns:
            [`XModalFusionOutput`] with `pooler_output` `(batch_size, cross_hidden_size)`.
        """
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        image = self._encode_image(pixel_values, interpolate_pos_encoding).last_hidden_state
        text = self._encode_text(input_ids, attention_mask, token_type_ids).last_hidden_state
        return self.fuse(
            image,
            text,
            attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

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

    def contrastive_objective(
        self, logits_per_text: torch.Tensor, negative_logits_per_image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The configured contrastive loss of a square `(batch_size, batch_size)` logits matrix: InfoNCE with label
        smoothing, or the SigLIP sigmoid loss. `negative_logits_per_image` `(batch_size, K)`: each image against K
        extra texts that match no image (hard negative captions, NegCLIP), in the image->text softmax of InfoNCE or
        as K more negative pairs per image of SigLIP."""
        if self.config.contrastive_loss_type == "siglip":
            loss = siglip_loss(logits_per_text)
            if negative_logits_per_image is None:
                return loss
            return loss - F.logsigmoid(-negative_logits_per_image).sum() / logits_per_text.shape[0]
        if negative_logits_per_image is None:
            return contrastive_loss(logits_per_text, self.config.label_smoothing)
        return contrastive_loss_with_negative_texts(
            logits_per_text, negative_logits_per_image, self.config.label_smoothing
        )

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
        output_attentions: bool | None = None,
        return_multimodal_output: bool = False,
    ) -> XModalOutput:
        r"""Image-text similarities of every image against every text; with one modality alone, its embeddings.

        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`, *optional*).
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, num_channels, height, width)`, *optional*).
            attention_mask (`torch.Tensor` of shape `(text_batch_size, sequence_length)`, *optional*).
            token_type_ids, position_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`, *optional*).
            return_loss (`bool`, *optional*): compute the symmetric InfoNCE loss (needs both modalities and equal
                batch sizes, pair i being image i with text i).
            interpolate_pos_encoding (`bool`): accept images of another resolution.
            output_hidden_states, output_attentions (`bool`, *optional*, default the config's): each tower's hidden
                states and attention weights, in `vision_model_output` / `text_model_output` (see
                `get_image_features`), and the fusion module's in `multimodal_output`.
            return_multimodal_output (`bool`): also run the fusion module on the pairs (image i with text i, equal
                batch sizes) and return it as `multimodal_output` ([`XModalFusionOutput`], as FLAVA's `FlavaModel`).
                Off by default: the contrastive logits and loss (CLIP's) do not use the fusion module, which a loss on
                `multimodal_output` or a head ([`XModalForPreTraining`], ...) trains.

        Returns:
            [`XModalOutput`]. Given only `pixel_values` (or only text), the output holds that modality's normalised
            embeddings and tower output, and no logits: this is what the `image-feature-extraction` and
            `feature-extraction` pipelines call (their `[0]` is then `image_embeds` / `text_embeds`).
        """
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        has_text = input_ids is not None
        if pixel_values is None and not has_text:
            raise ValueError(
                "Give pixel_values (a float tensor of shape (batch_size, 3, height, width)), input_ids (an integer "
                "tensor of shape (batch_size, sequence_length)) or both."
            )
        if return_loss and (pixel_values is None or not has_text):
            raise ValueError("return_loss=True needs both pixel_values and input_ids (pair i: image i, text i).")
        if return_multimodal_output and (pixel_values is None or not has_text):
            raise ValueError("return_multimodal_output=True needs both pixel_values and input_ids (image i, text i).")
        vision_outputs = text_outputs = image_embeds = text_embeds = logits_per_text = loss = multimodal = None
        if pixel_values is not None:
            vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, **flags)
            image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        if has_text:
            text_outputs = self.get_text_features(input_ids, attention_mask, token_type_ids, position_ids, **flags)
            text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        if return_multimodal_output:
            multimodal = self.fuse(
                vision_outputs.last_hidden_state, text_outputs.last_hidden_state, attention_mask, **flags
            )
        if image_embeds is not None and text_embeds is not None:
            logits_per_text = self.logits(image_embeds, text_embeds)
        if return_loss:
            _check_pairs(logits_per_text)
            loss = self.contrastive_objective(logits_per_text)
        return XModalOutput(
            loss=loss,
            logits_per_image=logits_per_text.t() if logits_per_text is not None else None,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            multimodal_output=multimodal,
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

    @classmethod
    def from_clip(cls, clip_model_name_or_path: str | PreTrainedModel, **config_overrides: Any) -> XModalModel:
        r"""Builds an xmodal model from a transformers `CLIPModel`: both towers, both projections and the temperature
        are CLIP's, converted into xmodal's built-in towers (with CLIP's image pre-LayerNorm, causal text attention
        and [EOS] pooling, see `xmodal.conversion`), so the image and text embeddings are CLIP's; the fusion module
        and the heads of `cls` are newly initialised.

        Args:
            clip_model_name_or_path: a folder, Hub id or instance of a `CLIPModel`.
            **config_overrides: fields of [`XModalConfig`] for the new parts (`cross_config`, loss weights, ...); a
                `vision_config`/`text_config` dict updates the converted tower configs (e.g. dropout).

        Text inputs must be what CLIP's tokenizer gives: right-padded, the [EOS] token last; use CLIP's tokenizer in
        an [`XModalProcessor`] (with CLIP's image mean and std) to keep CLIP's preprocessing.

        Raises:
            ValueError: the model is not a CLIPModel, or its weights do not map onto the towers (a changed layout).
        """
        clip = (
            clip_model_name_or_path
            if isinstance(clip_model_name_or_path, nn.Module)
            else AutoModel.from_pretrained(clip_model_name_or_path)
        )
        model = cls(clip_to_xmodal_config(clip.config, **config_overrides))
        missing, unexpected = model.load_state_dict(clip_to_xmodal_state_dict(clip.state_dict()), strict=False)
        converted = ("vision_model.", "text_model.", "visual_projection.", "text_projection.", "logit_scale")
        not_loaded = [name for name in missing if name.startswith(converted)]
        if unexpected or not_loaded:
            raise ValueError(
                f"The CLIPModel's weights do not map onto xmodal's towers: unused {unexpected[:5]}, missing "
                f"{not_loaded[:5]}."
            )
        return model.eval()


def _load_tower(name_or_model: str | PreTrainedModel, attribute: str) -> PreTrainedModel | nn.Module:
    """A tower from a path / Hub id / model; an xmodal model contributes its own `vision_model`/`text_model`."""
    model = name_or_model if isinstance(name_or_model, nn.Module) else AutoModel.from_pretrained(name_or_model)
    if getattr(getattr(model, "config", None), "model_type", None) == XModalConfig.model_type:
        return getattr(model, attribute)
    if not hasattr(model, "config"):
        raise TypeError(f"{attribute} must be a transformers model or a path to one, got {type(model).__name__}.")
    # a task model (e.g. ViTForImageClassification) contributes its base model (ViTModel)
    return getattr(model, "base_model", model)


__all__ = [
    "XModalModel",
    "XModalPreTrainedModel",
]
