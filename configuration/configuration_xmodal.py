"""Configuration classes for xmodal: the image tower, the text tower, the cross-modal fusion module and the
composite model.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library and
transformers.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN

from xmodal.hub import AUTO_MAP, reject_push_in_save, write_remote_code

FUSION_DIRECTIONS = ("text_to_image", "image_to_text", "both")
POOLING_MODES = ("cls", "mean", "eos")
INITIALIZATIONS = ("normal", "clip")
# Tower styles a preset can be built in (`XModalConfig.from_preset(name, tower_style=...)`, `--tower_style`): the
# fields each sets over the preset. "bert" is the presets as shipped: BERT-style bidirectional text with an embedding
# LayerNorm, mean pooling, N(0, 0.02) weights. "clip" is CLIP's towers (Radford et al. 2021): an image pre-LayerNorm,
# [CLS] image pooling, causal text attention pooled at [EOS], no text embedding LayerNorm or token types, CLIP's
# scaled initialisation (bench/RESULTS.md, "Tower style", measures the two).
TOWER_STYLES: dict[str, dict[str, Any]] = {
    "bert": {},
    "clip": {
        "vision_pooling": "cls",
        "text_pooling": "eos",
        "vision_config": {"pre_layernorm": True, "initialization": "clip"},
        "text_config": {
            "embedding_layernorm": False,
            "is_causal": True,
            "type_vocab_size": 0,
            "initialization": "clip",
        },
    },
}
CONTRASTIVE_LOSS_TYPES = ("nt_xent", "siglip")
MIM_SOURCES = ("image", "fused")
ITM_SAMPLING = ("all", "half")
LOSS_WEIGHT_FIELDS = (
    "contrastive_loss_weight",
    "itm_loss_weight",
    "mlm_loss_weight",
    "mim_loss_weight",
    "captioning_loss_weight",
    "vqa_loss_weight",
)
# the keyword argument that carries the config file's location from `from_pretrained` to `from_dict`'s error messages
_SOURCE_KWARG = "_xmodal_config_source"
_PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


def _check_positive_int(config: PreTrainedConfig, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        lower = 0 if allow_zero else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lower:
            kind = "a non-negative" if allow_zero else "a positive"
            raise ValueError(f"{type(config).__name__}.{name} must be {kind} integer, got {value!r}.")


def _check_probability(config: PreTrainedConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{type(config).__name__}.{name} must be a float in [0, 1), got {value!r}.")


# the weight dtypes a config may name (transformers turns the name into `getattr(torch, name)`)
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "float", "half", "double", "float8_e4m3fn", "float8_e5m2")


def _check_dtype(config: PreTrainedConfig) -> None:
    """`dtype` must be None, a weight dtype name, a torch dtype or a dict of them (checked before transformers
    converts it, which would fail with an AttributeError)."""
    value = config.dtype
    if value is None:
        return
    for item in value.values() if isinstance(value, dict) else [value]:
        if type(item).__name__ != "dtype" and (not isinstance(item, str) or item not in _DTYPE_NAMES):
            raise ValueError(
                f"{type(config).__name__}.dtype must be None, one of {', '.join(_DTYPE_NAMES)} or a dict of these "
                f"(per module), got {value!r}."
            )


def _check_number(config: PreTrainedConfig, *names: str, non_negative: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (non_negative and value < 0)
        ):
            kind = "a finite non-negative number" if non_negative else "a finite number"
            raise ValueError(f"{type(config).__name__}.{name} must be {kind}, got {value!r}.")


def _check_bool(config: PreTrainedConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise TypeError(f"{type(config).__name__}.{name} must be true or false, got {value!r}.")


def merge_config_fields(values: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """`values` (XModalConfig fields) with each layer applied in turn: a dict given for a sub-config
    (`vision_config`, `text_config`, ...) updates only the keys it names; any other field is replaced."""
    merged = dict(values)
    for layer in layers:
        for key, value in layer.items():
            merged[key] = (
                {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
            )
    return merged


def _check_initialization(config: PreTrainedConfig) -> None:
    if config.initialization not in INITIALIZATIONS:
        raise ValueError(
            f"{type(config).__name__}.initialization {config.initialization!r} is unknown; accepted: "
            f"{', '.join(INITIALIZATIONS)}."
        )


def _check_transformer_dims(config: PreTrainedConfig) -> None:
    """Shared checks of every transformer stack: positive sizes, heads dividing the width, a known activation, a
    non-negative initialiser range."""
    _check_positive_int(config, "hidden_size", "intermediate_size", "num_attention_heads")
    _check_positive_int(config, "num_hidden_layers", allow_zero=isinstance(config, XModalCrossConfig))
    if config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"{type(config).__name__}.hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
            f"({config.num_attention_heads})."
        )
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        raise ValueError(
            f"{type(config).__name__}.hidden_act {config.hidden_act!r} is unknown; accepted: {sorted(ACT2FN)}."
        )
    eps = config.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{type(config).__name__}.layer_norm_eps must be positive, got {config.layer_norm_eps!r}.")
    _check_probability(config, "hidden_dropout_prob", "attention_dropout")
    _check_number(config, "initializer_range", non_negative=True)


class XModalVisionConfig(PreTrainedConfig):
    r"""Configuration of the xmodal ViT image encoder: conv patch embedding, a [CLS] token, learned position
    embeddings and pre-LayerNorm transformer blocks.

    Args:
        hidden_size (`int`): width of the encoder.
        intermediate_size (`int`): width of the MLP.
        num_hidden_layers (`int`): number of transformer blocks.
        num_attention_heads (`int`): attention heads; must divide `hidden_size`.
        num_channels (`int`): input channels.
        image_size (`int`): square input resolution the position embeddings are trained for.
        patch_size (`int`): square patch size; must divide `image_size`.
        hidden_act (`str`): MLP activation (a key of `transformers.activations.ACT2FN`).
        layer_norm_eps (`float`): LayerNorm epsilon.
        hidden_dropout_prob (`float`): dropout on residual branches.
        attention_dropout (`float`): dropout on attention probabilities.
        drop_path_rate (`float`): stochastic depth (Huang et al. 2016, timm's `DropPath`) in [0, 1): in training,
            each sample's attention and MLP branches are dropped (and the kept ones scaled by 1/keep) with a rate
            rising linearly from 0 at the first block to `drop_path_rate` at the last. 0 (default) disables it.
        initializer_range (`float`): std of the normal initialiser.
        pre_layernorm (`bool`): a LayerNorm on the embeddings before the first block, as CLIP's ViT has
            (`pre_layrnorm`, Radford et al. 2021); off by default.
        initialization (`str`): `"normal"` (every weight N(0, initializer_range), BERT/ViT) or `"clip"` (CLIP's
            scaled initialisation, as transformers' `CLIPPreTrainedModel`: attention inputs d^-0.5 (2L)^-0.5, outputs
            d^-0.5, MLP inputs (2d)^-0.5, outputs d^-0.5 (2L)^-0.5, [CLS] embedding and the tower's projection
            d^-0.5, for width d and depth L).
    """

    model_type: ClassVar[str] = "xmodal_vision_model"
    base_config_key: ClassVar[str] = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    pre_layernorm: bool = False
    initialization: str = "normal"

    def __post_init__(self, **kwargs: Any) -> None:
        _check_dtype(self)
        super().__post_init__(**kwargs)
        _check_transformer_dims(self)
        _check_probability(self, "drop_path_rate")
        _check_bool(self, "pre_layernorm")
        _check_initialization(self)
        _check_positive_int(self, "num_channels", "image_size", "patch_size")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"XModalVisionConfig.patch_size ({self.patch_size}) must divide image_size ({self.image_size})."
            )


class XModalTextConfig(PreTrainedConfig):
    r"""Configuration of the xmodal BERT-style bidirectional text encoder: word, position and (optionally) token
    type embeddings followed by pre-LayerNorm transformer blocks with padding-aware attention.

    Args:
        vocab_size (`int`): size of the token vocabulary; must match the tokenizer.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: as in BERT.
        max_position_embeddings (`int`): longest sequence the position embeddings cover.
        type_vocab_size (`int`): number of token types (segments); 0 disables token type embeddings.
        hidden_act, layer_norm_eps, hidden_dropout_prob, attention_dropout, initializer_range: as in BERT.
        drop_path_rate (`float`): stochastic depth, as in [`XModalVisionConfig`] (0 at the first block, rising
            linearly to `drop_path_rate` at the last; 0, the default, disables it). A caption's branch is dropped
            as a whole, also when the tower skips the padding.
        pad_token_id (`int`): id of the padding token.
        embedding_layernorm (`bool`): the LayerNorm after the summed embeddings, as in BERT (default); off in
            CLIP's text tower.
        is_causal (`bool`): causal self-attention (each token attends to itself and the tokens before it), as in
            CLIP's text tower, where the last token ([EOS], `text_pooling="eos"`) sums up the caption; off (BERT's
            bidirectional attention) by default.
        initialization (`str`): `"normal"` or `"clip"`, as in [`XModalVisionConfig`].
    """

    model_type: ClassVar[str] = "xmodal_text_model"
    base_config_key: ClassVar[str] = "text_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_dropout: float = 0.1
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    embedding_layernorm: bool = True
    is_causal: bool = False
    initialization: str = "normal"

    def __post_init__(self, **kwargs: Any) -> None:
        _check_dtype(self)
        super().__post_init__(**kwargs)
        _check_transformer_dims(self)
        _check_probability(self, "drop_path_rate")
        _check_bool(self, "embedding_layernorm", "is_causal")
        _check_initialization(self)
        _check_positive_int(self, "vocab_size", "max_position_embeddings")
        _check_positive_int(self, "type_vocab_size", allow_zero=True)
        if self.pad_token_id is not None and (
            isinstance(self.pad_token_id, bool)
            or not isinstance(self.pad_token_id, int)
            or not 0 <= self.pad_token_id < self.vocab_size
        ):
            raise ValueError(
                f"XModalTextConfig.pad_token_id ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size})."
            )


class XModalCrossConfig(PreTrainedConfig):
    r"""Configuration of the cross-modal fusion module: transformer layers of self-attention, cross-attention and
    an MLP, where the queries come from one modality and the keys/values from the other.

    Args:
        direction (`str`): which modality provides the queries.
            `"text_to_image"`: text tokens attend to image patches (Q = text, K = V = image; ALBEF/BLIP);
            `"image_to_text"`: image patches attend to text tokens (Q = image, K = V = text);
            `"both"`: co-attention, two streams that each attend to the other (ViLBERT).
        hidden_size (`int`): width of the fusion layers; tower outputs of another width are projected to it.
        intermediate_size, num_hidden_layers, num_attention_heads, hidden_act, layer_norm_eps,
        hidden_dropout_prob, attention_dropout, initializer_range: as for the towers. `num_hidden_layers=0`
            builds no fusion module (a pure dual encoder).
        drop_path_rate (`float`): stochastic depth of the fusion layers, as in [`XModalVisionConfig`] (0 at the
            first layer, rising linearly to `drop_path_rate` at the last; the self-attention, cross-attention and
            MLP branches of a pair are dropped independently; with `"both"`, each stream's layers have their own
            draws). 0 (default) disables it. Unused in `XModalConfig.mim_decoder_config` (MAE's decoder has none).
    """

    model_type: ClassVar[str] = "xmodal_cross_model"
    base_config_key: ClassVar[str] = "cross_config"

    direction: str = "text_to_image"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        _check_dtype(self)
        super().__post_init__(**kwargs)
        if self.direction not in FUSION_DIRECTIONS:
            raise ValueError(
                f"XModalCrossConfig.direction {self.direction!r} is unknown; accepted: {', '.join(FUSION_DIRECTIONS)}."
            )
        _check_transformer_dims(self)
        _check_probability(self, "drop_path_rate")


class XModalDecoderConfig(PreTrainedConfig):
    r"""Configuration of the xmodal text decoder used for captioning and generative VQA: token and position
    embeddings, then pre-LayerNorm blocks of causal self-attention, cross-attention to the image tokens and an MLP,
    and a language-modelling head tied to the token embeddings.

    Args:
        vocab_size (`int`): vocabulary size; must match the tokenizer (the text tower's, by default).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, hidden_act, layer_norm_eps,
        hidden_dropout_prob, attention_dropout, initializer_range: as for the towers. The decoder has no stochastic
            depth (`drop_path_rate` of the towers and the fusion module).
        max_position_embeddings (`int`): longest sequence (prompt plus generated tokens).
        bos_token_id, eos_token_id, pad_token_id (`int`): generation starts with `bos_token_id` ([CLS] of the
            xmodal tokenizer) and stops at `eos_token_id` ([SEP]).
    """

    model_type: ClassVar[str] = "xmodal_text_decoder"
    base_config_key: ClassVar[str] = "decoder_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs: Any) -> None:
        _check_dtype(self)
        super().__post_init__(**kwargs)
        _check_transformer_dims(self)
        _check_positive_int(self, "vocab_size", "max_position_embeddings")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size
            ):
                raise ValueError(
                    f"XModalDecoderConfig.{name} ({value!r}) must be None or an id in [0, vocab_size={self.vocab_size})."
                )


def _fields(value: dict | None) -> dict:
    """The fields of a sub-config given as a dict (or None), without its `model_type`."""
    return {key: item for key, item in (value or {}).items() if key != "model_type"}


def _tower_config(
    value: PreTrainedConfig | dict | None, default_class: type[PreTrainedConfig], field: str
) -> PreTrainedConfig:
    """Builds a tower config from a config, a dict (any transformers `model_type`, e.g. "vit" or "bert") or None."""
    if isinstance(value, PreTrainedConfig):
        return value
    if value is None:
        return default_class()
    if not isinstance(value, dict):
        raise TypeError(
            f"XModalConfig.{field} must be a PreTrainedConfig, a dict or None, got {type(value).__name__}."
        )
    value = dict(value)
    model_type = value.pop("model_type", default_class.model_type)
    if model_type == default_class.model_type:
        return _sub_config(default_class, value, field)
    try:
        return AutoConfig.for_model(model_type, **value)
    except ValueError as err:
        raise ValueError(f"XModalConfig.{field} has an unknown model_type {model_type!r}: {err}") from err


def _sub_config(config_class: type[PreTrainedConfig], fields: dict, field: str) -> PreTrainedConfig:
    """`config_class(**fields)`, with an error naming the field of XModalConfig (e.g. `vision_config`) it came from."""
    try:
        return config_class(**fields)
    except (ValueError, TypeError) as err:
        raise (TypeError if isinstance(err, TypeError) else ValueError)(f"XModalConfig.{field}: {err}") from err


def _config_file(source: object) -> str:
    """How to name the config being loaded in an error: its config.json for a local folder, else the name given."""
    if not source:
        return "(built from a dict)"
    source = os.fspath(source)
    if os.path.isdir(source):
        return repr(os.path.join(source, "config.json"))
    return repr(source) if source.endswith(".json") else f"{source!r} (config.json)"


class XModalConfig(PreTrainedConfig):
    r"""Configuration of an xmodal model: an image tower, a text tower, a cross-modal fusion module and the
    contrastive projection.

    Either tower may be the built-in one (`XModalVisionConfig` / `XModalTextConfig`) or any transformers model
    config (e.g. a `ViTConfig` or `BertConfig`), which lets pretrained towers be plugged in with
    `XModalModel.from_vision_text_pretrained`.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*): image tower configuration.
        text_config (`dict` or `PreTrainedConfig`, *optional*): text tower configuration.
        cross_config (`dict` or `XModalCrossConfig`, *optional*): fusion module configuration.
        projection_dim (`int`): dimension of the shared image-text embedding space.
        logit_scale_init_value (`float`): initial value of the learnable log inverse temperature,
            ln(1/0.07) as in CLIP.
        max_logit_scale (`float`): upper clamp of exp(logit_scale) (100 in CLIP).
        vision_pooling, text_pooling (`str`): `"cls"` (first token) or `"mean"` (masked mean of tokens); for text
            also `"eos"`, the last non-padding token (CLIP's [EOS] pooling, for a causal text tower).
        decoder_config (`dict` or `XModalDecoderConfig`, *optional*): the captioning decoder; by default as wide
            and deep as the fusion module, over the text tower's vocabulary (a dict overrides only what it names).
        *_loss_weight (`float`): weights of the pretraining objectives in [`XModalForPreTraining`]: contrastive,
            image-text matching, masked language modelling, masked image modelling, captioning and VQA
            (0 disables an objective and skips its compute).
        contrastive_loss_type (`str`): `"nt_xent"` (symmetric InfoNCE with the learnable temperature, CLIP) or
            `"siglip"` (pairwise sigmoid loss with a learnable bias, SigLIP).
        label_smoothing (`float`): label smoothing of the InfoNCE cross-entropies.
        logit_bias_init_value (`float`): initial SigLIP bias (-10 in the paper; use logit_scale_init_value=ln 10).
        queue_size (`int`): K, the number of past momentum embeddings used as extra negatives (MoCo/ALBEF);
            0 disables the queue and the momentum encoders.
        momentum (`float`): EMA coefficient of the momentum encoders.
        save_queue (`bool`): whether `save_pretrained` writes the queue and the momentum encoders.
        multiview_loss_weight (`float`): weight of the image-image NT-Xent term when two augmented views are given.
        itm_hard_negatives (`bool`): sample ITM negatives from the contrastive similarities (ALBEF) instead of
            uniformly.
        itm_sampling (`str`): `"half"` (default) fuses B pairs per batch, half of them replaced by hard negatives
            (the UNITER/ViLT budget, balanced classes); `"all"` fuses 3B pairs: every positive, a negative image per
            text and a negative text per image (ALBEF), three times the ITM compute (see bench/multitask_cost.py).
        itm_contrastive_prior (`float`): initial weight of the pair's contrastive logit (exp(logit_scale) x cosine,
            detached) added to the ITM match logit, so that matching starts from the dual encoder's ranking and the
            fusion module learns what it misses; learned from there. 0 gives ALBEF's plain head on the fused [CLS].
        auxiliary_batch_size (`int`, *optional*): MLM, MIM, captioning and VQA see only the first this many pairs
            of each batch, and ITM fuses only these pairs and their negatives (the costs grow with the pairs fused),
            while the contrastive loss keeps every pair and ITM draws its negatives from every pair; None (default):
            every pair.
        itm_rerank_top_k (`int`): candidates per query that [`XModalForImageTextRetrieval`] re-ranks with ITM.
        mlm_probability (`float`): share of text tokens masked for MLM (BERT's 80/10/10 rule applies).
        mask_token_id (`int`): the [MASK] id; special_token_ids (`list[int]`): ids never masked (default:
            padding, [CLS]=2, [SEP]=3 and [MASK] of the xmodal tokenizer).
        mim_mask_ratio (`float`): share of image patches masked for MIM (0.75, MAE); the built-in image tower
            encodes only the visible ones.
        mim_decoder_config (`dict` or `XModalCrossConfig`, *optional*): the MIM decoder's transformer blocks (its
            `direction` is unused); by default one block at half the fusion module's width (MAE's light decoder); a
            dict overrides only what it names.
        mim_source (`str`): reconstruct from the image tower's tokens (`"image"`) or from the fused image stream
            (`"fused"`, needs `cross_config.direction` `image_to_text` or `both`).
        mim_norm_pix_loss (`bool`): regress per-patch normalised pixels (MAE).
        tie_word_embeddings (`bool`): tie the MLM head to the text tower's word embeddings and the captioning
            head to the decoder's token embeddings.

    Example:

    ```python
    >>> from xmodal import XModalConfig, XModalModel
    >>> config = XModalConfig.from_preset("tiny")
    >>> model = XModalModel(config)
    ```
    """

    model_type: ClassVar[str] = "xmodal"
    sub_configs_defaults: ClassVar[dict] = {
        "vision_config": XModalVisionConfig,
        "text_config": XModalTextConfig,
        "cross_config": XModalCrossConfig,
        "decoder_config": XModalDecoderConfig,
        "mim_decoder_config": XModalCrossConfig,
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    cross_config: PreTrainedConfig | dict | None = None
    decoder_config: PreTrainedConfig | dict | None = None
    mim_decoder_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    max_logit_scale: float = 100.0
    vision_pooling: str = "cls"
    text_pooling: str = "cls"
    contrastive_loss_weight: float = 1.0
    itm_loss_weight: float = 1.0
    mlm_loss_weight: float = 1.0
    mim_loss_weight: float = 1.0
    captioning_loss_weight: float = 1.0
    vqa_loss_weight: float = 1.0
    contrastive_loss_type: str = "nt_xent"
    label_smoothing: float = 0.0
    logit_bias_init_value: float = -10.0
    queue_size: int = 0
    momentum: float = 0.995
    save_queue: bool = False
    multiview_loss_weight: float = 1.0
    itm_hard_negatives: bool = True
    itm_sampling: str = "half"
    itm_contrastive_prior: float = 1.0
    itm_rerank_top_k: int = 16
    auxiliary_batch_size: int | None = None
    mlm_probability: float = 0.15
    mask_token_id: int = 4
    special_token_ids: list[int] | None = None
    mim_mask_ratio: float = 0.75
    mim_source: str = "image"
    mim_norm_pix_loss: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        _check_dtype(self)
        self.vision_config = _tower_config(self.vision_config, XModalVisionConfig, "vision_config")
        self.text_config = _tower_config(self.text_config, XModalTextConfig, "text_config")
        for field in ("cross_config", "decoder_config", "mim_decoder_config"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, (dict, PreTrainedConfig)):
                raise TypeError(
                    f"XModalConfig.{field} must be a PreTrainedConfig, a dict or None, got {type(value).__name__}."
                )
        if isinstance(self.cross_config, dict):
            self.cross_config = _sub_config(XModalCrossConfig, _fields(self.cross_config), "cross_config")
        # the decoders' defaults follow the towers and the fusion module; a dict overrides only the fields it names
        if not isinstance(self.decoder_config, PreTrainedConfig):
            try:
                self.decoder_config = self._default_decoder_config(**_fields(self.decoder_config))
            except (ValueError, TypeError) as err:
                raise (TypeError if isinstance(err, TypeError) else ValueError)(
                    f"XModalConfig.decoder_config: {err}"
                ) from err
        if not isinstance(self.mim_decoder_config, PreTrainedConfig):
            try:
                self.mim_decoder_config = self._default_mim_decoder_config(**_fields(self.mim_decoder_config))
            except (ValueError, TypeError) as err:
                raise (TypeError if isinstance(err, TypeError) else ValueError)(
                    f"XModalConfig.mim_decoder_config: {err}"
                ) from err
        if self.special_token_ids is None:
            self.special_token_ids = sorted(
                {token for token in (getattr(self.text_config, "pad_token_id", None), 2, 3, self.mask_token_id)}
                - {None}
            )
        super().__post_init__(**kwargs)
        _check_positive_int(self, "projection_dim")
        _check_number(self, "logit_scale_init_value")
        if (
            isinstance(self.max_logit_scale, bool)
            or not isinstance(self.max_logit_scale, (int, float))
            or not math.isfinite(self.max_logit_scale)
            or self.max_logit_scale <= 0
        ):
            raise ValueError(
                f"XModalConfig.max_logit_scale must be a finite positive number, got {self.max_logit_scale!r}."
            )
        for field in ("vision_pooling", "text_pooling"):
            modes = POOLING_MODES if field == "text_pooling" else tuple(m for m in POOLING_MODES if m != "eos")
            if getattr(self, field) not in modes:
                raise ValueError(
                    f"XModalConfig.{field} {getattr(self, field)!r} is unknown; accepted: {', '.join(modes)}."
                )
        if self.contrastive_loss_type not in CONTRASTIVE_LOSS_TYPES:
            raise ValueError(
                f"XModalConfig.contrastive_loss_type {self.contrastive_loss_type!r} is unknown; accepted: "
                f"{', '.join(CONTRASTIVE_LOSS_TYPES)}."
            )
        if self.itm_sampling not in ITM_SAMPLING:
            raise ValueError(
                f"XModalConfig.itm_sampling {self.itm_sampling!r} is unknown; accepted: {', '.join(ITM_SAMPLING)}."
            )
        if self.mim_source not in MIM_SOURCES:
            raise ValueError(
                f"XModalConfig.mim_source {self.mim_source!r} is unknown; accepted: {', '.join(MIM_SOURCES)}."
            )
        _check_probability(self, "label_smoothing", "mlm_probability")
        _check_number(self, "logit_bias_init_value")
        _check_number(self, "initializer_range", "itm_contrastive_prior", non_negative=True)
        _check_bool(self, "save_queue", "itm_hard_negatives", "mim_norm_pix_loss", "tie_word_embeddings")
        if not isinstance(self.special_token_ids, list) or not all(
            isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in self.special_token_ids
        ):
            raise ValueError(
                f"XModalConfig.special_token_ids must be a list of non-negative token ids, got {self.special_token_ids!r}."
            )
        for field in ("mim_mask_ratio", "momentum"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"XModalConfig.{field} must be a float in (0, 1), got {value!r}.")
        _check_positive_int(self, "queue_size", allow_zero=True)
        if self.auxiliary_batch_size is not None:
            _check_positive_int(self, "auxiliary_batch_size")
        if self.queue_size and self.contrastive_loss_type == "siglip":
            raise ValueError(
                "XModalConfig.queue_size > 0 (momentum queue negatives) needs contrastive_loss_type='nt_xent'."
            )
        _check_positive_int(self, "itm_rerank_top_k")
        _check_positive_int(self, "mask_token_id", allow_zero=True)
        for field in (*LOSS_WEIGHT_FIELDS, "multiview_loss_weight"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"XModalConfig.{field} must be a non-negative number, got {value!r}.")

    def _default_mim_decoder_config(self, **fields: Any) -> XModalCrossConfig:
        """One transformer block at half the fusion module's width (MAE's decoder is lighter than its encoder),
        with `fields` overriding."""
        cross = self.cross_config if isinstance(self.cross_config, PreTrainedConfig) else XModalCrossConfig()
        heads = max(1, cross.num_attention_heads // 2)
        defaults = {
            "hidden_size": max(heads, (cross.hidden_size // 2) // heads * heads),
            "intermediate_size": max(1, cross.intermediate_size // 2),
            "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "hidden_act": cross.hidden_act,
            "layer_norm_eps": cross.layer_norm_eps,
        }
        return XModalCrossConfig(**{**defaults, **fields})

    def _default_decoder_config(self, **fields: Any) -> XModalDecoderConfig:
        """A captioning decoder as wide and deep as the fusion module, over the text tower's vocabulary, with
        `fields` overriding."""
        text = self.text_config
        cross = self.cross_config if isinstance(self.cross_config, PreTrainedConfig) else XModalCrossConfig()
        defaults = {
            "vocab_size": text.vocab_size,
            "max_position_embeddings": getattr(text, "max_position_embeddings", 512),
            "pad_token_id": getattr(text, "pad_token_id", 0),
            "hidden_size": cross.hidden_size,
            "intermediate_size": cross.intermediate_size,
            "num_hidden_layers": max(cross.num_hidden_layers, 1),
            "num_attention_heads": cross.num_attention_heads,
        }
        return XModalDecoderConfig(**{**defaults, **fields})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> XModalConfig:
        """`PreTrainedConfig.from_pretrained`; an invalid field raises a `ValueError`/`TypeError` naming the config
        file and the field (see `from_dict`). As with transformers' configs, the path is not kept in the config."""
        kwargs.setdefault(_SOURCE_KWARG, os.fspath(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> XModalConfig:
        """`PreTrainedConfig.from_dict`, with errors that name the config file (when loading one: `from_pretrained`,
        `AutoConfig`, `AutoModel`) and the field, e.g. `Invalid xmodal config '/ckpt/config.json':
        XModalConfig.vision_config: XModalVisionConfig.hidden_size must be a positive integer, got 'abc'.`

        Raises:
            TypeError: if the file does not hold a JSON object, or a field has the wrong type.
            ValueError: if a field has an invalid value (negative size, heads not dividing the width, ...).
        """
        source = (
            kwargs.pop(_SOURCE_KWARG, None)
            or kwargs.get("name_or_path")
            or (config_dict.get("_name_or_path") if isinstance(config_dict, dict) else None)
        )
        where = _config_file(source)
        if not isinstance(config_dict, dict):
            raise TypeError(
                f"Invalid xmodal config {where}: it must hold a JSON object of config fields, got a "
                f"{type(config_dict).__name__}."
            )
        try:
            return super().from_dict(config_dict, **kwargs)
        except (ValueError, TypeError) as err:
            raise (TypeError if isinstance(err, TypeError) else ValueError)(
                f"Invalid xmodal config {where}: {err}"
            ) from err

    def to_dict(self) -> dict[str, Any]:
        """`PreTrainedConfig.to_dict`, with the sub-configs as the model uses them, so that a config saved before and
        after a reload has the same keys and values: each sub-config's `dtype` is the model's (transformers sets it
        on every sub-config when it builds or loads a model) and no sub-config keeps the `_name_or_path` of a tower
        loaded from a folder (transformers drops it at the top level; a local path is no part of the config)."""
        output = super().to_dict()
        for key in self.sub_configs:
            sub_config = output.get(key)
            if isinstance(sub_config, dict):
                sub_config.pop("_name_or_path", None)
                if output.get("dtype") is not None:
                    sub_config["dtype"] = output["dtype"]
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Saves config.json with the complete `auto_map`, together with the remote-code bundle, so the folder loads
        with `trust_remote_code=True` where xmodal is not installed."""
        reject_push_in_save(push_to_hub)
        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, **kwargs)
        write_remote_code(save_directory)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The text decoder's config for `decoder=True` (so generation reads its BOS/EOS/PAD ids and vocabulary),
        otherwise the text tower's."""
        if decoder and not encoder:
            return self.decoder_config
        return self.text_config

    @classmethod
    def available_presets(cls) -> list[str]:
        """Names of the presets shipped in `configuration/presets/`."""
        if not os.path.isdir(_PRESET_DIR):
            return []
        return sorted(name[: -len(".json")] for name in os.listdir(_PRESET_DIR) if name.endswith(".json"))

    @classmethod
    def from_preset(cls, name: str, tower_style: str = "bert", **overrides: Any) -> XModalConfig:
        """Builds a config from a shipped preset (`tiny`, `small`, `base`) in a tower style (`TOWER_STYLES`: `"bert"`,
        the preset as shipped, or `"clip"`, CLIP's towers at the preset's sizes).

        Keyword overrides replace top-level fields; a dict given for `vision_config`, `text_config` or
        `cross_config` updates only the keys it names, e.g.
        `XModalConfig.from_preset("tiny", text_config={"vocab_size": 1000})`.
        """
        presets = cls.available_presets()
        if name not in presets:
            raise ValueError(f"Unknown xmodal preset {name!r}; available presets: {', '.join(presets)}.")
        if tower_style not in TOWER_STYLES:
            raise ValueError(f"Unknown tower_style {tower_style!r}; accepted: {', '.join(TOWER_STYLES)}.")
        with open(os.path.join(_PRESET_DIR, f"{name}.json"), encoding="utf-8") as handle:
            values = json.load(handle)
        return cls(**merge_config_fields(values, TOWER_STYLES[tower_style], overrides))

    @classmethod
    def from_vision_text_configs(
        cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs: Any
    ) -> XModalConfig:
        """Builds a config around two existing tower configs (any transformers model types)."""
        return cls(vision_config=copy.deepcopy(vision_config), text_config=copy.deepcopy(text_config), **kwargs)


__all__ = [
    "TOWER_STYLES",
    "XModalConfig",
    "XModalCrossConfig",
    "XModalDecoderConfig",
    "XModalTextConfig",
    "XModalVisionConfig",
]
