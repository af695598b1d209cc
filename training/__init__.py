"""xmodal.training: the embedded data, the pretraining loop, evaluation, model cards and the `xmodal` CLI."""

from .cards import render_model_card, write_model_card
from .evaluation import embed_dataset, evaluate_retrieval, retrieval_metrics
from .pretrain import ImageTextCollator, PretrainArguments, build_processor, optimizer_param_groups, pretrain

__all__ = [
    "ImageTextCollator",
    "PretrainArguments",
    "build_processor",
    "embed_dataset",
    "evaluate_retrieval",
    "optimizer_param_groups",
    "pretrain",
    "render_model_card",
    "retrieval_metrics",
    "write_model_card",
]
