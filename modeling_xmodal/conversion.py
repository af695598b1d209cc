"""Conversion of a transformers `CLIPModel` into xmodal's built-in towers (`XModalModel.from_clip`): the config
that reproduces CLIP's architecture and the mapping of its weights.

CLIP's towers are xmodal's in the `"clip"` tower style (`TOWER_STYLES`): a LayerNorm on the image embeddings
(`pre_layernorm`), no LayerNorm on the text embeddings (`embedding_layernorm=False`), causal text attention pooled at
the [EOS] token (`is_causal=True`, `text_pooling="eos"`). The separate q/k/v projections become one fused `qkv_proj`.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PreTrainedConfig

from xmodal.configuration.configuration_xmodal import TOWER_STYLES, XModalConfig, merge_config_fields

_TOWER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
)

# CLIP name -> xmodal name, for the weights that are not attention projections
_RENAMES = (
    (r"^text_model\.embeddings\.token_embedding\.", "text_model.embeddings.word_embeddings."),
    (r"^text_model\.embeddings\.position_embedding\.", "text_model.embeddings.position_embeddings."),
    (r"^vision_model\.pre_layrnorm\.", "vision_model.pre_layernorm."),
)
_QKV = re.compile(r"^(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$")


def clip_to_xmodal_config(clip_config: PreTrainedConfig, **config_overrides: Any) -> XModalConfig:
    """The `XModalConfig` whose built-in towers compute what a `CLIPConfig`'s towers compute: the `"clip"` tower style
    (`TOWER_STYLES`) at CLIP's sizes, activation (`quick_gelu`), LayerNorm epsilon, vocabulary, positions, image and
    patch size, projection dimension and initial temperature; a fusion module (and any head) of the xmodal defaults,
    or as `config_overrides` say."""
    if getattr(clip_config, "model_type", None) != "clip":
        raise ValueError(f"from_clip needs a CLIPModel (model_type 'clip'), got {clip_config.model_type!r}.")
    vision, text = clip_config.vision_config, clip_config.text_config
    vision_config = {name: getattr(vision, name) for name in _TOWER_FIELDS}
    vision_config.update(num_channels=vision.num_channels, image_size=vision.image_size, patch_size=vision.patch_size)
    text_config = {name: getattr(text, name) for name in _TOWER_FIELDS}
    text_config.update(
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        hidden_dropout_prob=0.0,
        pad_token_id=text.pad_token_id if text.pad_token_id is not None and text.pad_token_id < text.vocab_size else 0,
    )
    sizes = {
        "vision_config": vision_config,
        "text_config": text_config,
        "projection_dim": clip_config.projection_dim,
        "logit_scale_init_value": clip_config.logit_scale_init_value,
    }
    return XModalConfig(**merge_config_fields(sizes, TOWER_STYLES["clip"], config_overrides))


def clip_to_xmodal_state_dict(clip_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `CLIPModel` state dict under xmodal's names and shapes: q/k/v projections fused into `qkv_proj` (rows
    `[q; k; v]`), the class and position embeddings of the image tower as `(1, 1, D)` / `(1, 1 + N, D)`
    parameters, and a zero bias for the patch embedding (CLIP's has none). Non-weight buffers (`position_ids`) are
    dropped."""
    state: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in clip_state_dict.items():
        if name.endswith("position_ids"):
            continue
        match = _QKV.match(name)
        if match:
            fused.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = tensor
            continue
        for pattern, replacement in _RENAMES:
            name = re.sub(pattern, replacement, name)
        if name == "vision_model.embeddings.class_embedding":
            tensor = tensor.reshape(1, 1, -1)
        elif name == "vision_model.embeddings.position_embedding.weight":
            name, tensor = "vision_model.embeddings.position_embedding", tensor.unsqueeze(0)
        state[name] = tensor
    for (prefix, kind), parts in fused.items():
        state[f"{prefix}.qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    state.setdefault("vision_model.embeddings.patch_embedding.bias", patch.new_zeros(patch.shape[0]))
    return state


__all__ = ["clip_to_xmodal_config", "clip_to_xmodal_state_dict"]
