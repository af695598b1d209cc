"""xmodal.training, one subpackage per stage: `data` (sources, synthetic scenes, augmentations, collators) ->
`pretraining` (the Accelerate loop, budget, selection, checkpoints) -> `evaluation` (held-out metrics) -> `inference`
(embeddings, zero-shot, retrieval) and `transfer` (fine-tuning, linear probes, prompt learning) -> `publishing`
(model card, plots, push); `losses` gather across processes; `cli` is the `xmodal` command over all of them.

The documented entry points are re-exported here."""

from .data.augmentations import ImageAugmentation, PairAugmentation, TextAugmentation, make_views, mirror_left_right
from .data.collate import ImageTextCollator
from .data.pipeline import DataArguments, load_pretraining_data
from .evaluation.evaluator import (
    EvaluationTask,
    embed_dataset,
    evaluate_model,
    evaluate_retrieval,
    evaluation_task,
    itm_metrics,
    retrieval_metrics,
)
from .inference import ZeroShotClassifier, chunked_topk, index_image_folder, rank_images, rank_texts
from .losses import ContrastiveLoss, GlobalBatch, LossBalancer
from .pretraining.arguments import OBJECTIVES, PretrainArguments, parse_objectives
from .pretraining.builders import build_config, build_processor, optimizer_param_groups, train_augmentation
from .pretraining.loop import pretrain
from .pretraining.schedule import BudgetedSchedule, parse_duration
from .pretraining.selection import ModelSelection
from .publishing.cards import render_model_card, write_model_card
from .publishing.plots import plot_loss_curve, plot_retrieval_example, retrieval_example_picture
from .publishing.push import push_to_hub
from .transfer.finetune import finetune
from .transfer.finetune_arguments import FinetuneArguments
from .transfer.linear_probe import LinearProbe, extract_features, fit_linear_probe, linear_probe_evaluation
from .transfer.prompt_learning import PromptLearner, load_prompts, train_prompts

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
