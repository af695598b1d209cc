"""What sits on the towers: the cross-attention fusion module, the MLM / ITM / VQA heads, the MIM decoder, the
captioning text decoder and the momentum encoder with its queue of negatives.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithCrossAttentions

from xmodal.checks import _check_ranges, _text_id_ranges
from xmodal.configuration.configuration_xmodal import XModalConfig, XModalCrossConfig, XModalDecoderConfig
from xmodal.layers import (
    XModalEncoderLayer,
    XModalPreTrainedSubModel,
    _additive_padding_mask,
    _causal_mask,
    _drop_path_rates,
    _restore_visible,
    _TokenPacking,
)
from xmodal.outputs import XModalFusionOutput
from xmodal.towers import _pool

if TYPE_CHECKING:
    from xmodal.modeling_base import XModalModel


class XModalFusionModel(XModalPreTrainedSubModel):
    """Cross-modal fusion: transformer layers with self-attention, cross-attention and an MLP; a `PreTrainedModel`
    on `XModalCrossConfig` (so its attention implementation is `cross_config`'s).

    `direction="text_to_image"`: Q = text, K = V = image; `"image_to_text"`: Q = image, K = V = text; `"both"`:
    co-attention, where at every layer each stream attends to the other stream's input to that layer.
    Tower outputs of another width are first projected to `cross_config.hidden_size`. Stochastic depth rises
    linearly from 0 at the first layer to `cross_config.drop_path_rate` at the last (per pair, in each stream).

    As in the text tower, on CPU the text stream of `"text_to_image"` runs unpadded (projections, MLPs, LayerNorms
    and the cross-attention queries on the real tokens only; `skip_padding`, default None: on CPU only), outside
    `torch.compile` and when no hidden states or attentions are asked for; its outputs at padding are then zeros.
    """

    config_class = XModalCrossConfig
    input_modalities = ("image", "text")

    def __init__(self, config: XModalCrossConfig, vision_hidden_size: int, text_hidden_size: int) -> None:
        super().__init__(config)
        self.skip_padding: bool | None = None
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
        self.post_init()

    def forward(
        self,
        image_hidden_states: torch.Tensor,
        text_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> XModalFusionOutput:
        """`image_hidden_states` `(B, Li, Dv)`, `text_hidden_states` `(B, Lt, Dt)`, text `attention_mask` `(B, Lt)`.
        With `image_index` `(B,)`, pair b is text b with image `image_index[b]` of `image_hidden_states` `(M, Li, Dv)`:
        when only text attends to the image, each image's keys/values are computed once for all its pairs.

        With `output_hidden_states` / `output_attentions`, each stream that has layers (the text stream for
        `text_to_image`, the image stream for `image_to_text`, both for `both`) returns its hidden states (the
        projected input, then each layer's output) and its self- and cross-attention weights per layer; see
        [`XModalFusionOutput`]."""
        if image_index is not None and self.image_layers is not None:
            # the image stream is updated per pair: materialise the pairs
            image_hidden_states, image_index = image_hidden_states.index_select(0, image_index), None
        image = self.image_input_projection(image_hidden_states)
        text = self.text_input_projection(text_hidden_states)
        text_mask = _additive_padding_mask(attention_mask, text.dtype)
        # with co-attention the image stream's keys/values are the padded text: no packing there
        padded = text_mask is not None and self.image_layers is None
        inspected = output_hidden_states or output_attentions
        packing = _TokenPacking.when_skipped(attention_mask, padded, self.skip_padding, text.device, inspected)
        if packing is not None:
            text = packing.unpad(text)  # (N, D): the text stream's token-wise work on real tokens only
        streams = [name for name, layers in (("text", self.text_layers), ("image", self.image_layers)) if layers]
        hidden = {"text": (text,), "image": (image,)} if output_hidden_states else None
        attentions = {name: ([], []) for name in streams} if output_attentions else None
        for index in range(self.config.num_hidden_layers):
            new_text = text
            if self.text_layers:
                new_text, *weights = self.text_layers[index](
                    text,
                    text_mask,
                    image,
                    None,
                    encoder_index=image_index,
                    packing=packing,
                    output_attentions=output_attentions,
                )
                _record(attentions, "text", weights)
            if self.image_layers:
                image, *weights = self.image_layers[index](
                    image, None, text, text_mask, output_attentions=output_attentions
                )
                _record(attentions, "image", weights)
            text = new_text
            if output_hidden_states:
                hidden = {"text": hidden["text"] + (text,), "image": hidden["image"] + (image,)}
        if self.text_layer_norm is not None:
            text = self.text_layer_norm(text)
        if packing is not None:
            text = packing.pad(text)  # (B, Lt, D), zeros at the padding
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
        inspected = {}
        for name in streams:
            if hidden is not None:
                inspected[f"{name}_hidden_states"] = hidden[name]
            if attentions is not None:
                inspected[f"{name}_attentions"] = tuple(attentions[name][0])
                inspected[f"{name}_cross_attentions"] = tuple(attentions[name][1])
        return XModalFusionOutput(
            pooler_output=pooled, text_last_hidden_state=text, image_last_hidden_state=image_tokens, **inspected
        )


def _record(attentions: dict[str, tuple[list, list]] | None, stream: str, weights: list) -> None:
    """Appends a layer's self- and cross-attention weights (where computed) to `attentions[stream]`."""
    if attentions is None:
        return
    for collected, weight in zip(attentions[stream], weights, strict=True):
        if weight is not None:
            collected.append(weight)


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


class XModalMIMDecoder(XModalPreTrainedSubModel):
    """MAE's decoder (He et al. 2022): the encoded visible patches, projected to the decoder width, are put back in
    place among shared [MASK] tokens, given position embeddings, passed through the self-attention blocks of
    `config.mim_decoder_config`, and a linear head predicts every patch's pixels: `(B, 1 + num_visible, D)` and
    `bool_masked_pos` `(B, N)` -> `(B, N, P * P * C)`. Tokens of an external tower that kept all patches (with its
    own mask token, SimMIM style) are used as they are.

    A `PreTrainedModel` on `config.mim_decoder_config` (its attention implementation is that sub-config's); built
    by [`XModalMIMDecoder.from_model_config`]."""

    config_class = XModalCrossConfig

    def __init__(self, config: XModalCrossConfig, input_size: int, num_patches: int, patch_dim: int) -> None:
        super().__init__(config)
        self.num_patches = num_patches
        self.input_projection = nn.Linear(input_size, config.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches, config.hidden_size))
        self.layers = nn.ModuleList([XModalEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, patch_dim)
        self.post_init()

    @classmethod
    def from_model_config(cls, config: XModalConfig, input_size: int) -> XModalMIMDecoder:
        """The decoder of `config.mim_decoder_config` predicting the patches of `config.vision_config`."""
        vision = config.vision_config
        num_patches = (vision.image_size // vision.patch_size) ** 2
        return cls(config.mim_decoder_config, input_size, num_patches, vision.patch_size**2 * vision.num_channels)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:  # the decoder holds these parameters itself
            init.zeros_(self.mask_token)
            init.trunc_normal_(self.position_embedding, std=self.config.initializer_range)

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
            full, _, _ = layer(full)
        return self.head(self.layer_norm(full))


class XModalTextDecoder(XModalPreTrainedSubModel):
    """The captioning decoder: token + position embeddings, then layers of causal (cached) self-attention,
    cross-attention to the image tokens and an MLP (BLIP/CoCa): `input_ids` `(B, L)` and image tokens
    `(B, Li, vision_hidden)` -> `(B, L, decoder_hidden)`. A `PreTrainedModel` on `XModalDecoderConfig`, as BLIP's
    text decoder. As the text tower, on CPU an uncached padded batch (training) runs unpadded (`skip_padding`,
    default None: on CPU only), its outputs at padding zeros; with a cache (generation) the layout stays padded."""

    config_class = XModalDecoderConfig
    input_modalities = ("text",)

    def __init__(self, config: XModalDecoderConfig, vision_hidden_size: int) -> None:
        super().__init__(config)
        self.skip_padding: bool | None = None
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
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        check_values: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithCrossAttentions:
        """`attention_mask` `(B, past + L)` covers the cached tokens too. The ids are checked against the vocabulary
        unless `check_values=False` (a caller that checked them already).

        Returns:
            `BaseModelOutputWithCrossAttentions` with `last_hidden_state` `(B, L, decoder_hidden)` (final LayerNorm
            applied), and when asked `hidden_states` (the embeddings, then each layer's output, `(B, L,
            decoder_hidden)`), `attentions` (causal self-attention, `(B, H, L, past + L)` per layer) and
            `cross_attentions` (to the image tokens, `(B, H, L, Li)` per layer)."""
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
        # uncached (training): a cache keeps the padded layout of the positions it stores
        padded = (
            cache is None and mask is not None and attention_mask is not None and attention_mask.shape[1] == length
        )
        inspected = output_hidden_states or output_attentions
        packing = _TokenPacking.when_skipped(
            attention_mask, padded, self.skip_padding, hidden_states.device, inspected
        )
        if packing is not None:
            hidden_states = packing.unpad(hidden_states)  # (N, D)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        attentions = {"text": ([], [])} if output_attentions else None
        for layer in self.layers:
            hidden_states, *weights = layer(
                hidden_states, mask, image, None, cache=cache, packing=packing, output_attentions=output_attentions
            )
            _record(attentions, "text", weights)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
        last_hidden_state = self.final_layer_norm(hidden_states)
        return BaseModelOutputWithCrossAttentions(
            last_hidden_state=packing.pad(last_hidden_state) if packing is not None else last_hidden_state,
            hidden_states=all_hidden_states,
            attentions=tuple(attentions["text"][0]) if attentions is not None else None,
            cross_attentions=tuple(attentions["text"][1]) if attentions is not None else None,
        )


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


__all__ = [
    "XModalFusionModel",
    "XModalITMHead",
    "XModalMIMDecoder",
    "XModalMLMHead",
    "XModalMomentumEncoder",
    "XModalTextDecoder",
    "XModalVQAHead",
]
