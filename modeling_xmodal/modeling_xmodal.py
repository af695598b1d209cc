"""PyTorch xmodal: a ViT image encoder, a BERT-style text encoder, a cross-attention fusion module and a
contrastive projection, with transformers' attention interface, gradient checkpointing and safetensors weights.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers and its siblings.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple, logging

from xmodal.configuration.configuration_xmodal import (
    XModalConfig,
    XModalCrossConfig,
    XModalTextConfig,
    XModalVisionConfig,
)

logger = logging.get_logger(__name__)


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
            image tokens after fusion (the projected tower output when the image provides no queries).
    """

    pooler_output: torch.FloatTensor | None = None
    text_last_hidden_state: torch.FloatTensor | None = None
    image_last_hidden_state: torch.FloatTensor | None = None


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    r"""Symmetric InfoNCE / NT-Xent loss (CLIP; Chen et al. 2020) over a square similarity matrix.

    For pairs (i, i), L = 1/2 [ -1/N sum_i log softmax_j(s_ij / t) - 1/N sum_i log softmax_j(s_ji / t) ],
    where `logits_per_text` already holds s_ij / t.

    Args:
        logits_per_text (`torch.Tensor` of shape `(batch_size, batch_size)`): text rows, image columns.
    """
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2.0


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
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _additive_padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`(B, L)` 1/0 key-padding mask -> additive `(B, 1, 1, L)` mask, or None when nothing is padded (so sdpa can
    take its unmasked fast path)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    mask = mask.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return mask[:, None, None, :]


class XModalAttention(nn.Module):
    """Multi-head attention through transformers' attention interface (sdpa by default, eager available).

    Self-attention uses one fused QKV projection; cross-attention (`is_cross_attention=True`) projects the
    queries from `hidden_states` and the keys/values from `encoder_hidden_states`.
    """

    def __init__(self, config: PreTrainedConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False
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
    ) -> torch.Tensor:
        """`hidden_states` `(B, Lq, C)`, `encoder_hidden_states` `(B, Lk, C)`, additive `attention_mask`
        `(B, 1, 1, Lk)` -> `(B, Lq, C)`."""
        batch_size, query_length, _ = hidden_states.shape
        if self.is_cross_attention:
            query = self.q_proj(hidden_states).view(batch_size, query_length, self.num_heads, self.head_dim)
            key_length = encoder_hidden_states.shape[1]
            kv = self.kv_proj(encoder_hidden_states).view(batch_size, key_length, 2, self.num_heads, self.head_dim)
            key, value = kv.unbind(dim=2)
        else:
            qkv = self.qkv_proj(hidden_states).view(batch_size, query_length, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.unbind(dim=2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
        )
        return self.out_proj(attn_output.reshape(batch_size, query_length, self.embed_dim))


class XModalMLP(nn.Module):
    """Two-layer feed-forward block: `(B, L, C)` -> `(B, L, C)`."""

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class XModalEncoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + SelfAttn(LN(x)) [+ CrossAttn(LN(x), LN(context))] + MLP(LN(x)).

    With `has_cross_attention=True` it is a fusion layer: the queries come from `hidden_states` and the
    keys/values from `encoder_hidden_states` (the other modality), as in ALBEF/BLIP.
    """

    def __init__(self, config: PreTrainedConfig, has_cross_attention: bool = False) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = XModalAttention(config)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.cross_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.context_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.cross_attn = XModalAttention(config, is_cross_attention=True)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = XModalMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(B, L, C)`; masks are additive `(B, 1, 1, L)`; `encoder_hidden_states` `(B, Lk, C)`."""
        hidden_states = hidden_states + self.dropout(self.self_attn(self.layer_norm1(hidden_states), attention_mask))
        if self.has_cross_attention:
            context = self.context_layer_norm(encoder_hidden_states)
            cross = self.cross_attn(self.cross_layer_norm(hidden_states), encoder_attention_mask, context)
            hidden_states = hidden_states + self.dropout(cross)
        return hidden_states + self.dropout(self.mlp(self.layer_norm2(hidden_states)))


class XModalEncoder(nn.Module):
    """A stack of `num_hidden_layers` [`XModalEncoderLayer`] blocks."""

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([XModalEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


# --------------------------------------------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------------------------------------------


class XModalVisionEmbeddings(nn.Module):
    """Conv patch embedding + [CLS] token + learned position embeddings (bicubically interpolated for other
    resolutions when asked): `(B, C, H, W)` -> `(B, 1 + H/P * W/P, D)`."""

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

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
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
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, num_patches, D)
        embeddings = torch.cat([self.class_embedding.expand(batch_size, -1, -1), patches], dim=1)
        return self.dropout(embeddings + self.interpolate_pos_encoding(height, width))


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
    ) -> BaseModelOutput:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
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
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}.")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}.")
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {length} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "truncate the text (processor(..., truncation=True, max_length=...))."
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"input_ids contain ids outside [0, vocab_size={self.config.vocab_size}) (min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}); the tokenizer does not match the model's text_config.vocab_size."
            )
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None, :]
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            # absent token_type_ids mean segment 0, as in BERT, so outputs agree whether or not a tokenizer sends them
            embeddings = embeddings + (
                self.token_type_embeddings(token_type_ids)
                if token_type_ids is not None
                else self.token_type_embeddings.weight[0]
            )
        return self.dropout(self.layer_norm(embeddings))


class XModalTextTransformer(nn.Module):
    """The built-in BERT-style bidirectional text tower: `input_ids` `(B, L)` -> tokens `(B, L, D)` with padding-
    aware self-attention and a final LayerNorm."""

    def __init__(self, config: XModalTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = XModalTextEmbeddings(config)
        self.encoder = XModalEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        hidden_states = self.embeddings(input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        mask = _additive_padding_mask(attention_mask, hidden_states.dtype)
        outputs = self.encoder(hidden_states, mask, output_hidden_states=output_hidden_states)
        outputs.last_hidden_state = self.final_layer_norm(outputs.last_hidden_state)
        return outputs


def _build_tower(config: PreTrainedConfig, builtin_class: type[nn.Module], builtin_config: type) -> nn.Module:
    """The built-in tower for an xmodal tower config, else `AutoModel.from_config` (e.g. ViT, BERT) without its
    unused pooling head."""
    # compare model types, not classes: remote code may load the config module more than once
    if config.model_type == builtin_config.model_type:
        return builtin_class(config)
    if not isinstance(getattr(config, "hidden_size", None), int):
        raise ValueError(
            f"A {config.model_type!r} tower has no integer `hidden_size`; xmodal supports transformer towers with a "
            "token sequence output (e.g. vit, clip_vision_model, bert, roberta)."
        )
    model_class = AutoModel._model_mapping[type(config)]
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}
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
    Tower outputs of another width are first projected to `cross_config.hidden_size`.
    """

    def __init__(self, config: XModalCrossConfig, vision_hidden_size: int, text_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.image_input_projection = (
            nn.Linear(vision_hidden_size, hidden) if vision_hidden_size != hidden else nn.Identity()
        )
        self.text_input_projection = nn.Linear(text_hidden_size, hidden) if text_hidden_size != hidden else nn.Identity()
        layers = lambda: nn.ModuleList(  # noqa: E731
            [XModalEncoderLayer(config, has_cross_attention=True) for _ in range(config.num_hidden_layers)]
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
    ) -> XModalFusionOutput:
        """`image_hidden_states` `(B, Li, Dv)`, `text_hidden_states` `(B, Lt, Dt)`, text `attention_mask` `(B, Lt)`."""
        image = self.image_input_projection(image_hidden_states)
        text = self.text_input_projection(text_hidden_states)
        text_mask = _additive_padding_mask(attention_mask, text.dtype)
        for index in range(self.config.num_hidden_layers):
            new_text = self.text_layers[index](text, text_mask, image, None) if self.text_layers else text
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
        return XModalFusionOutput(pooler_output=pooled, text_last_hidden_state=text, image_last_hidden_state=image)


# --------------------------------------------------------------------------------------------------------------
# Pretrained models
# --------------------------------------------------------------------------------------------------------------


class XModalPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by every xmodal model."""

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

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XModalVisionEmbeddings):
            init.trunc_normal_(module.class_embedding, std=module.config.initializer_range)
            init.trunc_normal_(module.position_embedding, std=module.config.initializer_range)
        elif isinstance(module, XModalModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class XModalModel(XModalPreTrainedModel):
    """The xmodal model: image and text towers, a contrastive projection with a learnable temperature, and a
    cross-modal fusion module.

    `forward` gives image-text similarity logits (and the symmetric InfoNCE loss with `return_loss=True`);
    `get_image_features` / `get_text_features` give projected embeddings; `get_multimodal_features` gives the
    fused representation of image-text pairs.
    """

    main_input_name = "input_ids"

    def __init__(self, config: XModalConfig) -> None:
        super().__init__(config)
        self.vision_model = _build_tower(config.vision_config, XModalVisionTransformer, XModalVisionConfig)
        self.text_model = _build_tower(config.text_config, XModalTextTransformer, XModalTextConfig)
        vision_hidden, text_hidden = config.vision_config.hidden_size, config.text_config.hidden_size
        self.visual_projection = nn.Linear(vision_hidden, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_hidden, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.cross_model = (
            XModalFusionModel(config.cross_config, vision_hidden, text_hidden)
            if config.cross_config.num_hidden_layers > 0
            else None
        )
        self.post_init()

    def _encode_image(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, output_hidden_states: bool = False
    ) -> BaseModelOutput:
        if pixel_values is None:
            raise ValueError("pixel_values is required (a float tensor of shape (batch_size, 3, height, width)).")
        kwargs: dict[str, Any] = {"output_hidden_states": output_hidden_states}
        if interpolate_pos_encoding:
            kwargs["interpolate_pos_encoding"] = True
        return self.vision_model(pixel_values=pixel_values, **kwargs)

    def _encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        if input_ids is None:
            raise ValueError("input_ids is required (an integer tensor of shape (batch_size, sequence_length)).")
        kwargs = {"token_type_ids": token_type_ids, "position_ids": position_ids}
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        return self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states, **kwargs
        )

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
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        r"""Projected text embeddings.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for tokens,
                0 for padding.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` `(batch_size, projection_dim)` is the projected,
            unnormalised text embedding.
        """
        outputs = self._encode_text(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        pooled = _pool(outputs.last_hidden_state, self.config.text_pooling, attention_mask)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.text_projection(pooled),
            hidden_states=outputs.hidden_states,
        )

    def fuse(
        self,
        image_hidden_states: torch.Tensor,
        text_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> XModalFusionOutput:
        """Runs the fusion module on tower outputs already computed (so objectives can share one tower pass).

        Args:
            image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_image_tokens, vision_hidden_size)`).
            text_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): text padding mask.
        """
        if self.cross_model is None:
            raise ValueError("This model has no fusion module (cross_config.num_hidden_layers=0).")
        if image_hidden_states.shape[0] != text_hidden_states.shape[0]:
            raise ValueError(
                f"Fusion pairs images with texts one to one: got {image_hidden_states.shape[0]} images and "
                f"{text_hidden_states.shape[0]} texts."
            )
        return self.cross_model(image_hidden_states, text_hidden_states, attention_mask)

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
        image = self._encode_image(pixel_values, interpolate_pos_encoding)
        text = self._encode_text(input_ids, attention_mask, token_type_ids)
        return self.fuse(image.last_hidden_state, text.last_hidden_state, attention_mask)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities `(num_texts, num_images)` of L2-normalised embeddings, with the learnable
        temperature clamped so that exp(logit_scale) <= max_logit_scale (CLIP)."""
        scale = self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()
        return scale * text_embeds @ image_embeds.t()

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
            if logits_per_text.shape[0] != logits_per_text.shape[1]:
                raise ValueError(
                    f"return_loss=True needs as many texts as images (pairs), got {logits_per_text.shape[0]} texts "
                    f"and {logits_per_text.shape[1]} images."
                )
            loss = contrastive_loss(logits_per_text)
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
        if pixel_values is None:
            raise ValueError("pixel_values is required (a float tensor of shape (batch_size, 3, height, width)).")
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
    "XModalForImageClassification",
    "XModalFusionOutput",
    "XModalModel",
    "XModalOutput",
    "XModalPreTrainedModel",
    "contrastive_loss",
]
