"""The two unimodal towers: a ViT image encoder and a BERT-style text encoder (embeddings + encoder), and the
pooling of their tokens.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput

from xmodal.configuration.configuration_xmodal import XModalTextConfig, XModalVisionConfig
from xmodal.layers import (
    XModalAttention,
    XModalEncoder,
    XModalMLP,
    XModalPreTrainedSubModel,
    _additive_padding_mask,
    _causal_mask,
    _keep_visible,
    _TokenPacking,
)


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


class XModalVisionTransformer(XModalPreTrainedSubModel):
    """The built-in ViT image tower, a `PreTrainedModel` on `XModalVisionConfig` (as CLIP's `CLIPVisionModel`):
    `pixel_values` `(B, C, H, W)` -> tokens `(B, 1 + num_patches, D)`, final LayerNorm applied (and, with
    `config.pre_layernorm`, one on the embeddings, as in CLIP)."""

    config_class = XModalVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["XModalEncoderLayer", "XModalVisionEmbeddings"]

    def __init__(self, config: XModalVisionConfig) -> None:
        super().__init__(config)
        self.embeddings = XModalVisionEmbeddings(config)
        self.pre_layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm else None
        )
        self.encoder = XModalEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XModalVisionEmbeddings):
            init.trunc_normal_(module.class_embedding, std=module.config.initializer_range)
            init.trunc_normal_(module.position_embedding, std=module.config.initializer_range)
        if self.config.initialization == "clip":
            _clip_initialization(self, module)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        bool_masked_pos: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`).
            interpolate_pos_encoding (`bool`): interpolate the position embeddings for another resolution.
            output_hidden_states (`bool`): return `hidden_states`, the input of the first layer (the embeddings,
                after `pre_layernorm`) and each layer's output, `(batch_size, num_tokens, hidden_size)` each (before
                the final LayerNorm, as CLIP's).
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*): patches dropped
                before the encoder (MAE); `num_tokens` is then `1 + num_visible`.
            output_attentions (`bool`): return `attentions`, each layer's `(batch_size, num_heads, num_tokens,
                num_tokens)` weights (with an implementation that computes them, e.g. eager).

        Returns:
            `BaseModelOutput` with `last_hidden_state` `(batch_size, num_tokens, hidden_size)`.
        """
        hidden_states = self.embeddings(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, bool_masked_pos=bool_masked_pos
        )
        if self.pre_layernorm is not None:
            hidden_states = self.pre_layernorm(hidden_states)
        outputs = self.encoder(
            hidden_states, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        outputs.last_hidden_state = self.post_layernorm(outputs.last_hidden_state)
        return outputs


class XModalTextEmbeddings(nn.Module):
    """Word + position (+ token type) embeddings, LayerNorm (unless `config.embedding_layernorm` is off, as in CLIP)
    and dropout, as in BERT: `(B, L)` -> `(B, L, D)`."""

    def __init__(self, config: XModalTextConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        self.layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.embedding_layernorm else None
        )
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
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        return self.dropout(embeddings)


class XModalTextTransformer(XModalPreTrainedSubModel):
    """The built-in BERT-style bidirectional text tower, a `PreTrainedModel` on `XModalTextConfig` (as CLIP's
    `CLIPTextModel`): `input_ids` `(B, L)` (or word embeddings `inputs_embeds` `(B, L, D)`) -> tokens `(B, L, D)` with
    padding-aware self-attention and a final LayerNorm. With `config.is_causal` the self-attention is causal, as in
    CLIP's text tower.

    On CPU a padded batch runs unpadded: the projections, MLPs and LayerNorms see only the real tokens (see
    `_TokenPacking`), so padding costs no compute outside attention; the outputs at padding positions are zeros.
    `skip_padding` (default None: on CPU only) sets where: on a GPU, gathering the real tokens needs a host
    synchronisation that cost more than the padding in `bench/train_step.py` (H200, bf16). Under `torch.compile`,
    and when hidden states or attentions are asked for (so that they are the tensors of the computation, e.g. for
    `retain_grad`), the padded layout is kept."""

    config_class = XModalTextConfig
    input_modalities = ("text",)
    _no_split_modules = ["XModalEncoderLayer", "XModalTextEmbeddings"]

    def __init__(self, config: XModalTextConfig) -> None:
        super().__init__(config)
        self.skip_padding: bool | None = None
        self.embeddings = XModalTextEmbeddings(config)
        self.encoder = XModalEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if self.config.initialization == "clip":
            _clip_initialization(self, module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for tokens, 0 for
                padding.
            token_type_ids, position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*).
            output_hidden_states (`bool`): return `hidden_states`, the embeddings and each layer's output,
                `(batch_size, sequence_length, hidden_size)` each (before the final LayerNorm).
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                word embeddings instead of `input_ids` (exactly one of the two).
            output_attentions (`bool`): return `attentions`, each layer's `(batch_size, num_heads, sequence_length,
                sequence_length)` weights (with an implementation that computes them, e.g. eager).

        Returns:
            `BaseModelOutput` with `last_hidden_state` `(batch_size, sequence_length, hidden_size)`.
        """
        hidden_states = self.embeddings(
            input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        if self.config.is_causal:
            length = hidden_states.shape[1]
            mask = _causal_mask(attention_mask, length, 0, hidden_states.dtype, hidden_states.device)
        else:
            mask = _additive_padding_mask(attention_mask, hidden_states.dtype)
        inspected = output_hidden_states or output_attentions
        packing = _TokenPacking.when_skipped(
            attention_mask, mask is not None, self.skip_padding, hidden_states.device, inspected
        )
        if packing is not None:
            hidden_states = packing.unpad(hidden_states)  # (N, D)
        outputs = self.encoder(
            hidden_states,
            mask,
            output_hidden_states=output_hidden_states,
            packing=packing,
            output_attentions=output_attentions,
        )
        last_hidden_state = self.final_layer_norm(outputs.last_hidden_state)
        outputs.last_hidden_state = packing.pad(last_hidden_state) if packing is not None else last_hidden_state
        return outputs


def _clip_initialization(tower: nn.Module, module: nn.Module) -> None:
    """CLIP's scaled initialisation (transformers' `CLIPPreTrainedModel._init_weights`, factor 1) of `module`, a
    submodule of the built-in `tower`: for width d and depth L, attention inputs N(0, d^-0.5 (2L)^-0.5), attention
    outputs N(0, d^-0.5), MLP inputs N(0, (2d)^-0.5), MLP outputs N(0, d^-0.5 (2L)^-0.5), their biases 0, the [CLS]
    embedding N(0, d^-0.5). The tower's `_init_weights` calls it after transformers' N(0, initializer_range) draw
    (transformers initialises the modules that hold parameters, so the projections are recognised by their owner)."""
    width, depth = tower.config.hidden_size, tower.config.num_hidden_layers
    input_std = width**-0.5 * (2 * depth) ** -0.5
    if isinstance(module, XModalVisionEmbeddings):
        init.normal_(module.class_embedding, std=width**-0.5)
        return
    if not isinstance(module, nn.Linear):
        return
    for owner in tower.modules():
        if isinstance(owner, XModalAttention):
            stds = {owner.qkv_proj: input_std, owner.out_proj: width**-0.5}
        elif isinstance(owner, XModalMLP):
            stds = {owner.fc1: (2 * width) ** -0.5, owner.fc2: input_std}
        else:
            continue
        if module in stds:
            init.normal_(module.weight, std=stds[module])
            init.zeros_(module.bias)
            return


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
    """`(B, L, D)` -> `(B, D)`: the first ([CLS]) token; the last non-padding token (`"eos"`, text only: CLIP's
    [EOS] with right padding, the last position with left padding); or the mean of the tokens: the patches for
    images (the [CLS] token excluded, as in MAE), the non-padding tokens for text."""
    if mode == "cls":
        return hidden_states[:, 0]
    if mode == "eos":
        length = hidden_states.shape[1]
        if attention_mask is None:
            return hidden_states[:, -1]
        last = length - 1 - attention_mask.flip(1).to(torch.int64).argmax(dim=1)  # (B,) the last 1 of each row
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]
    if is_image:
        hidden_states = hidden_states[:, 1:]
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


__all__ = [
    "XModalTextEmbeddings",
    "XModalTextTransformer",
    "XModalVisionEmbeddings",
    "XModalVisionTransformer",
]
