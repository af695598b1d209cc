"""xmodal.training: data sources, augmentations, the pretraining loop, evaluation with local metric modules,
fine-tuning and inference helpers, model cards, publishing and the `xmodal` CLI."""

from .augmentations import ImageAugmentation, PairAugmentation, TextAugmentation, make_views, mirror_left_right
from .cards import render_model_card, write_model_card
from .collate import ImageTextCollator
from .data.pipeline import DataArguments, load_pretraining_data
from .evaluation import (
    EvaluationTask,
    embed_dataset,
    evaluate_model,
    evaluate_retrieval,
    evaluation_task,
    itm_metrics,
    retrieval_metrics,
)
from .finetune import FinetuneArguments, finetune
from .inference import ZeroShotClassifier, index_image_folder, rank_images, rank_texts
from .linear_probe import LinearProbe, extract_features, fit_linear_probe, linear_probe_evaluation
from .losses import ContrastiveLoss, GlobalBatch, LossBalancer
from .plots import plot_loss_curve, plot_retrieval_example, retrieval_example_picture
from .pretrain import (
    OBJECTIVES,
    PretrainArguments,
    build_config,
    build_processor,
    optimizer_param_groups,
    parse_objectives,
    pretrain,
    train_augmentation,
)
from .prompt_learning import PromptLearner, load_prompts, train_prompts
from .push import push_to_hub
from .schedule import BudgetedSchedule, parse_duration
from .search import chunked_topk
from .selection import ModelSelection

__all__ = [
    "OBJECTIVES",
    "BudgetedSchedule",
    "ContrastiveLoss",
    "DataArguments",
    "EvaluationTask",
    "FinetuneArguments",
    "GlobalBatch",
    "ImageAugmentation",
    "ImageTextCollator",
    "LinearProbe",
    "LossBalancer",
    "ModelSelection",
    "PairAugmentation",
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
    "itm_metrics",
    "linear_probe_evaluation",
    "load_pretraining_data",
    "load_prompts",
    "make_views",
    "mirror_left_right",
    "optimizer_param_groups",
    "parse_duration",
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
    "train_augmentation",
    "train_prompts",
    "write_model_card",
]
