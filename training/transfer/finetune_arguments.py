"""The options of `xmodal finetune` (`FinetuneArguments`, each also a command-line flag) and the task models they
select.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import PreTrainedModel

from xmodal import (
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForVisualQuestionAnswering,
    XModalModel,
)
from xmodal.training.publishing.trackers import parse_report_to

TASKS: tuple[str, ...] = ("image-classification", "vqa", "retrieval", "captioning")
CAPTION_TASKS: tuple[str, ...] = ("retrieval", "captioning")
"""The tasks trained on image-caption pairs (rows `image`, `text`)."""
TASK_MODELS: dict[str, type[PreTrainedModel]] = {
    "image-classification": XModalForImageClassification,
    "vqa": XModalForVisualQuestionAnswering,
    "retrieval": XModalModel,
    "captioning": XModalForConditionalGeneration,
}
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "image-classification": ("classifier",),
    "vqa": ("vqa_head",),
    "retrieval": (),
    "captioning": (),
}
"""The task-specific modules of each task model, trained in full beside LoRA adapters."""
ADAPTER_FOLDER = "adapter"
"""Sub-folder of the output folder holding the LoRA adapter alone (`PeftModel.from_pretrained(base, <it>)`)."""


@dataclass
class FinetuneArguments:
    """Options of `xmodal finetune` (each is also a command-line flag): fine-tune a pretrained xmodal folder for image
    classification, VQA, retrieval or captioning with transformers' Trainer, on the embedded procedural data unless
    --dataset is given; --lora_r > 0 trains LoRA adapters instead of every weight."""

    task: str = field(default="image-classification", metadata={"help": f"What to fine-tune for: {', '.join(TASKS)}."})
    model: str = field(
        default="outputs/xmodal-tiny", metadata={"help": "Folder of the pretrained xmodal model and processor."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder for the Hub-ready fine-tuned model (default: outputs/xmodal-<task>)."}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "A dataset folder saved with save_to_disk, or a name for datasets.load_dataset (e.g. imagefolder "
            "with --data_dir). Default: the embedded procedural data."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of --dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir for datasets.load_dataset(--dataset)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="test", metadata={"help": "Held-out split for the final metrics."})
    image_column: str = field(default="image", metadata={"help": "Column of the images."})
    label_column: str = field(
        default="label", metadata={"help": "image-classification: column of the class (ClassLabel, index or name)."}
    )
    question_column: str = field(default="question", metadata={"help": "vqa: column of the question."})
    answers_column: str = field(
        default="answers",
        metadata={
            "help": "vqa: column of the answer: one answer (string or index), the annotators' answers (list of "
            "strings, VQA v2 soft scores) or {answer: score}."
        },
    )
    caption_column: str = field(
        default="captions",
        metadata={
            "help": "retrieval, captioning: column of the captions: one string, or a list (one drawn per row and step "
            "in training; the first for the retrieval evaluation, all as captioning references)."
        },
    )
    num_train_examples: int = field(default=2000, metadata={"help": "Procedural training scenes (default data)."})
    num_eval_examples: int = field(default=500, metadata={"help": "Procedural held-out scenes (default data)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows only (VQA: question-answer rows)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "vqa, retrieval, captioning: longest question or caption in tokens (default: the tokenizer's "
            "model_max_length; captioning: at most the decoder's max_position_embeddings)."
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "captioning: longest generated caption in tokens (default: the caption length - 1)."},
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training rows."})
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps to train (overrides num_train_epochs if > 0)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Rows per forward pass and device."})
    eval_batch_size: int = field(default=64, metadata={"help": "Rows per evaluation forward pass and device."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Forward passes per optimizer step (effective batch = batch_size x this)."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay (not on biases and norms)."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Linear warmup: steps, or a fraction of the training steps if < 1."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler: cosine, linear, ..."})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimizer name: adamw_torch, sgd, ..."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N optimizer steps."})
    report_to: str = field(
        default="none",
        metadata={
            "help": "Trainer integrations, comma-separated (e.g. tensorboard, wandb), 'all' (every installed one) "
            "or 'none'; logs go under output_dir."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    seed: int = field(default=0, metadata={"help": "Seed of the procedural data, the new head and the data order."})
    lora_r: int = field(
        default=0,
        metadata={
            "help": "Rank of LoRA adapters on the attention projections (needs peft); 0 trains every weight. The "
            "task head and any module the checkpoint lacks train in full; captioning needs a pretrained decoder."
        },
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: updates scale by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch inputs."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        parse_report_to(self.report_to)
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", f"xmodal-{self.task}")
        for name in ("num_train_examples", "num_eval_examples", "batch_size", "eval_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"--gradient_accumulation_steps must be at least 1, got {self.gradient_accumulation_steps}."
            )
        for name in ("max_train_samples", "max_eval_samples", "max_length", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1 when given, got {getattr(self, name)}.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set --max_steps > 0 or --num_train_epochs > 0.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.warmup_steps < 0:
            raise ValueError("--weight_decay, --max_grad_norm and --warmup_steps must be non-negative.")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be 0 (off) or a positive rank, got {self.lora_r}.")
        if self.lora_alpha < 1:
            raise ValueError(f"--lora_alpha must be at least 1, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")


# ----------------------------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------------------------


__all__ = [
    "ADAPTER_FOLDER",
    "CAPTION_TASKS",
    "FinetuneArguments",
    "TASKS",
    "TASK_HEADS",
    "TASK_MODELS",
]
