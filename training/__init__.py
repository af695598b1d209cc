"""xmodal.training: data sources, augmentations, the pretraining loop, evaluation with local metric modules,
fine-tuning and inference helpers, model cards, publishing and the `xmodal` CLI."""

from .augmentations import ImageAugmentation, TextAugmentation, make_views
from .cards import render_model_card, write_model_card
from .data.pipeline import DataArguments, load_pretraining_data
from .evaluation import (
    EvaluationTask,
    embed_dataset,
    evaluate_model,
    evaluate_retrieval,
    evaluation_task,
    retrieval_metrics,
)
from .finetune import FinetuneArguments, finetune
from .inference import ZeroShotClassifier, index_image_folder, rank_images, rank_texts
from .linear_probe import LinearProbe, extract_features, fit_linear_probe, linear_probe_evaluation
from .losses import ContrastiveLoss, GlobalBatch
from .plots import plot_loss_curve, plot_retrieval_example, retrieval_example_picture
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
from .prompt_learning import PromptLearner, load_prompts, train_prompts
from .push import push_to_hub
from .search import chunked_topk

__all__ = [
    "OBJECTIVES",
    "ContrastiveLoss",
    "DataArguments",
    "EvaluationTask",
    "FinetuneArguments",
    "GlobalBatch",
    "ImageAugmentation",
    "ImageTextCollator",
    "LinearProbe",
    "PretrainArguments",
    "PromptLearner",
    "TextAugmentation",
    "ZeroShotClassifier",
    "build_config",
    "build_processor",
    "chunked_topk",
    "embed_dataset",
    "evaluate_model",
    "evaluate_retrieval",
    "evaluation_task",
    "extract_features",
    "finetune",
    "fit_linear_probe",
    "index_image_folder",
    "linear_probe_evaluation",
    "load_pretraining_data",
    "load_prompts",
    "make_views",
    "optimizer_param_groups",
    "parse_objectives",
    "plot_loss_curve",
    "plot_retrieval_example",
    "pretrain",
    "push_to_hub",
    "rank_images",
    "rank_texts",
    "render_model_card",
    "retrieval_example_picture",
    "retrieval_metrics",
    "train_prompts",
    "write_model_card",
]
