"""xmodal.training: the embedded data, augmentations, the pretraining loop, evaluation, model cards and the
`xmodal` CLI."""

from .augmentations import ImageAugmentation, TextAugmentation, make_views
from .cards import render_model_card, write_model_card
from .evaluation import embed_dataset, evaluate_retrieval, retrieval_metrics
from .pretrain import (
    OBJECTIVES,
    ImageTextCollator,
    PretrainArguments,
    build_config,
    build_processor,
    optimizer_param_groups,
    parse_objectives,
    pretrain,
)

__all__ = [
    "OBJECTIVES",
    "ImageAugmentation",
    "ImageTextCollator",
    "PretrainArguments",
    "TextAugmentation",
    "build_config",
    "build_processor",
    "embed_dataset",
    "evaluate_retrieval",
    "make_views",
    "optimizer_param_groups",
    "parse_objectives",
    "pretrain",
    "render_model_card",
    "retrieval_metrics",
    "write_model_card",
]
