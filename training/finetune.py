"""Fine-tuning a pretrained xmodal model with transformers' `Trainer`: image classification
(`XModalForImageClassification`) and visual question answering as classification over an answer vocabulary
(`XModalForVisualQuestionAnswering`).

`finetune(FinetuneArguments(...))` reads like the recipe: data -> processor and collator -> the model with a new head
-> `Trainer` -> accuracy on the held-out split -> a Hub-ready folder (weights, processor, remote code, metrics.json).
By default it trains on the embedded procedural data: `label` (the shape of the largest object) for classification,
every `questions`/`answers` pair for VQA (answers in `xmodal.training.data.ANSWER_VOCAB`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from transformers import EvalPrediction, PreTrainedModel, Trainer, TrainingArguments, set_seed

from xmodal import XModalConfig, XModalForImageClassification, XModalForVisualQuestionAnswering, XModalProcessor
from xmodal.training.data import ANSWER_VOCAB, SHAPES, make_synthetic_dataset
from xmodal.training.inference import load_image

TASKS: tuple[str, ...] = ("image-classification", "vqa")


@dataclass
class FinetuneArguments:
    """Options of `xmodal finetune` (each is also a command-line flag): fine-tune a pretrained xmodal folder for image
    classification or VQA with transformers' Trainer, on the embedded procedural data unless --dataset is given."""

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
    eval_split: str = field(default="test", metadata={"help": "Held-out split for the final accuracy."})
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
    num_train_examples: int = field(default=2000, metadata={"help": "Procedural training scenes (default data)."})
    num_eval_examples: int = field(default=500, metadata={"help": "Procedural held-out scenes (default data)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows only (VQA: question-answer rows)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    max_length: int | None = field(
        default=None, metadata={"help": "vqa: longest question in tokens (default: the tokenizer's model_max_length)."}
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
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    seed: int = field(default=0, metadata={"help": "Seed of the procedural data, the new head and the data order."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", f"xmodal-{self.task}")
        for name in ("num_train_examples", "num_eval_examples", "batch_size", "eval_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"--gradient_accumulation_steps must be at least 1, got {self.gradient_accumulation_steps}."
            )
        for name in ("max_train_samples", "max_eval_samples", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1 when given, got {getattr(self, name)}.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Set --max_steps > 0 or --num_train_epochs > 0.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.warmup_steps < 0:
            raise ValueError("--weight_decay, --max_grad_norm and --warmup_steps must be non-negative.")


# ----------------------------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------------------------


class ImageClassificationCollator:
    """Turns rows `{"image": PIL image or path, "label": class index or name}` into `XModalForImageClassification`
    inputs with the processor: `pixel_values` `(B, 3, H, W)` and `labels` `(B,)` (long).

    Args:
        processor: the model's `XModalProcessor` (its image processor resizes and normalises).
        label2id: class name -> index, for rows whose label is a name; with it, indices are checked to be in range.
        image_column, label_column: the columns read from each row.
    """

    def __init__(
        self,
        processor: XModalProcessor,
        label2id: Mapping[str, int] | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        self.processor = processor
        self.label2id = dict(label2id) if label2id is not None else None
        self.image_column = image_column
        self.label_column = label_column

    def _label(self, label: Any) -> int:
        if isinstance(label, str):
            if self.label2id is None or label not in self.label2id:
                known = sorted(self.label2id) if self.label2id else "none (no label2id given)"
                raise ValueError(f"Unknown class name {label!r}; known classes: {known}.")
            return self.label2id[label]
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise TypeError(f"A label must be a class index or name, got {type(label).__name__}: {label!r}.")
        if self.label2id is not None and not 0 <= label < len(self.label2id):
            raise ValueError(f"Class index {label} is out of range [0, {len(self.label2id)}).")
        return int(label)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [load_image(row[self.image_column]) for row in rows]
        batch = dict(self.processor(images=images, return_tensors="pt"))
        batch["labels"] = torch.tensor([self._label(row[self.label_column]) for row in rows], dtype=torch.long)
        return batch


def vqa_score(matches: int, num_answers: int) -> float:
    """The VQA v2 accuracy of an answer given by `matches` of `num_answers` annotators: min(matches / 3, 1), averaged
    over the `num_answers` leave-one-out subsets when there are several annotators (1, 2, 3, 4+ of 10 give 0.3, 0.6,
    0.9, 1.0); exact match with a single answer."""
    if num_answers < 2:
        return float(matches > 0)
    left_out_match = min((matches - 1) / 3, 1.0) if matches else 0.0
    left_out_other = min(matches / 3, 1.0)
    return (matches * left_out_match + (num_answers - matches) * left_out_other) / num_answers


class VQACollator:
    """Turns rows `{"image": PIL image or path, "question": str, "answers": ...}` into
    `XModalForVisualQuestionAnswering` inputs with the processor: `pixel_values` `(B, 3, H, W)`, the tokenized
    questions `input_ids`/`attention_mask` `(B, L)` and `labels`.

    A row's answer is one of: an answer string or index in `answer_vocab`; the annotators' answers (a list of strings,
    VQA v2), scored with `vqa_score` (answers outside the vocabulary are dropped, as VQA v2 does for rare answers);
    or `{answer: score}`. `labels` is `(B,)` answer indices (long) when every row has a single answer, otherwise
    `(B, num_answers)` soft scores (float) with single answers one-hot: both are what `vqa_loss` takes.

    Args:
        processor: the model's `XModalProcessor`.
        answer_vocab: the answers, in the order of the model's labels.
        max_length: longest question in tokens (default: the tokenizer's `model_max_length`).
        image_column, question_column, answers_column: the columns read from each row.
    """

    def __init__(
        self,
        processor: XModalProcessor,
        answer_vocab: Sequence[str],
        max_length: int | None = None,
        image_column: str = "image",
        question_column: str = "question",
        answers_column: str = "answers",
    ) -> None:
        self.processor = processor
        self.answer_vocab = list(answer_vocab)
        self.answer_index = {answer: index for index, answer in enumerate(self.answer_vocab)}
        if len(self.answer_index) != len(self.answer_vocab):
            raise ValueError("answer_vocab holds duplicate answers.")
        self.max_length = max_length
        self.image_column = image_column
        self.question_column = question_column
        self.answers_column = answers_column

    def _target(self, answers: Any) -> int | torch.Tensor:
        """An answer index, or the soft scores `(num_answers,)` of a list or dict of answers."""
        if isinstance(answers, str):
            if answers not in self.answer_index:
                raise ValueError(
                    f"Answer {answers!r} is not in the answer vocabulary ({len(self.answer_vocab)} answers)."
                )
            return self.answer_index[answers]
        if isinstance(answers, (int, np.integer)) and not isinstance(answers, bool):
            if not 0 <= answers < len(self.answer_vocab):
                raise ValueError(f"Answer index {answers} is out of range [0, {len(self.answer_vocab)}).")
            return int(answers)
        scores = torch.zeros(len(self.answer_vocab))
        if isinstance(answers, Mapping):
            for answer, score in answers.items():
                if answer in self.answer_index:
                    scores[self.answer_index[answer]] = float(score)
            return scores
        if isinstance(answers, Sequence) and all(isinstance(answer, str) for answer in answers):
            for answer, matches in Counter(answers).items():
                if answer in self.answer_index:
                    scores[self.answer_index[answer]] = vqa_score(matches, len(answers))
            return scores
        raise TypeError(
            f"A VQA answer must be a string, an index, a list of strings or a dict of scores, got {answers!r}."
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(
            self.processor(
                images=[load_image(row[self.image_column]) for row in rows],
                text=[row[self.question_column] for row in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        targets = [self._target(row[self.answers_column]) for row in rows]
        if all(isinstance(target, int) for target in targets):
            batch["labels"] = torch.tensor(targets, dtype=torch.long)
        else:
            one_hot = torch.eye(len(self.answer_vocab))
            batch["labels"] = torch.stack([one_hot[t] if isinstance(t, int) else t for t in targets])
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def _question_rows(dataset: Dataset) -> Dataset:
    """One row per question of the procedural data: `image`, `question`, `answers` (the answer string)."""
    scenes = dataset.select_columns(["image", "questions", "answers"]).cast_column("image", ImageFeature(decode=False))
    columns: dict[str, list[Any]] = {"image": [], "question": [], "answers": []}
    for scene in scenes:
        for question, answer in zip(scene["questions"], scene["answers"]):
            columns["image"].append(scene["image"])
            columns["question"].append(question)
            columns["answers"].append(answer)
    features = Features({"image": ImageFeature(), "question": Value("string"), "answers": Value("string")})
    return Dataset.from_dict(columns, features=features)


def _synthetic_splits(args: FinetuneArguments, image_size: int) -> tuple[Dataset, Dataset]:
    data = make_synthetic_dataset(
        num_train=args.num_train_examples,
        num_validation=0,
        num_test=args.num_eval_examples,
        seed=args.seed,
        image_size=image_size,
    )
    if args.task == "vqa":
        return _question_rows(data["train"]), _question_rows(data["test"])
    return data["train"], data["test"]


def _dataset_splits(args: FinetuneArguments) -> tuple[Dataset, Dataset]:
    if os.path.isdir(args.dataset) and os.path.isfile(os.path.join(args.dataset, "dataset_dict.json")):
        data = load_from_disk(args.dataset)
    else:
        data = load_dataset(args.dataset, args.dataset_config, data_dir=args.data_dir)
    if not isinstance(data, DatasetDict):
        raise ValueError(
            f"--dataset {args.dataset!r} must have named splits (a DatasetDict), got one {type(data).__name__}."
        )
    for split in (args.train_split, args.eval_split):
        if split not in data:
            raise ValueError(f"--dataset {args.dataset!r} has no split {split!r}; its splits: {', '.join(data)}.")
    return data[args.train_split], data[args.eval_split]


def _class_names(train: Dataset, eval_dataset: Dataset, column: str) -> list[str]:
    """ClassLabel names, or the distinct names (sorted) of a string column, or '0'..'n-1' for an integer column."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = set(train[column]) | set(eval_dataset[column])
    if all(isinstance(value, str) for value in values):
        return sorted(values)
    if all(isinstance(value, int) and value >= 0 for value in values):
        return [str(index) for index in range(max(values) + 1)]
    raise ValueError(f"Column {column!r} must hold class names or non-negative class indices.")


def _answer_vocabulary(train: Dataset, eval_dataset: Dataset, column: str) -> list[str]:
    """ClassLabel names, or every answer string of both splits, sorted (an answer seen only in evaluation is a class
    never trained: it counts as a wrong prediction, as it would outside the vocabulary)."""
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    answers: set[str] = set()
    for split in (train, eval_dataset):
        for value in split[column]:
            if isinstance(value, str):
                answers.add(value)
            elif isinstance(value, (Mapping, Sequence)):
                answers.update(answer for answer in value if isinstance(answer, str))
    if not answers:
        raise ValueError(f"Column {column!r} holds no answer strings: pass a ClassLabel column or strings.")
    return sorted(answers)


def load_finetune_data(args: FinetuneArguments, image_size: int) -> tuple[Dataset, Dataset, list[str]]:
    """The training and held-out rows (capped at --max_train_samples / --max_eval_samples) and the class names (VQA:
    the answer vocabulary), from --dataset or the procedural data drawn at `image_size`."""
    classification = args.task == "image-classification"
    if args.dataset is None:
        train, eval_dataset = _synthetic_splits(args, image_size)
    else:
        train, eval_dataset = _dataset_splits(args)
    needed = [
        args.image_column,
        *([args.label_column] if classification else [args.question_column, args.answers_column]),
    ]
    for name, split in (("training", train), ("held-out", eval_dataset)):
        missing = [column for column in needed if column not in split.column_names]
        if missing:
            raise ValueError(
                f"The {name} rows lack the columns {missing} (columns: {', '.join(split.column_names)}); "
                "see --image_column, --label_column, --question_column, --answers_column."
            )
    if args.dataset is None:
        labels = list(SHAPES) if classification else list(ANSWER_VOCAB)
    elif classification:
        labels = _class_names(train, eval_dataset, args.label_column)
    else:
        labels = _answer_vocabulary(train, eval_dataset, args.answers_column)
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(args.max_eval_samples, len(eval_dataset))))
    if len(train) == 0 or len(eval_dataset) == 0:
        raise ValueError(f"Empty split: {len(train)} training and {len(eval_dataset)} held-out rows.")
    return train, eval_dataset, labels


# ----------------------------------------------------------------------------------------------------------------
# Model, Trainer, recipe
# ----------------------------------------------------------------------------------------------------------------


def build_model(args: FinetuneArguments, labels: Sequence[str]) -> PreTrainedModel:
    """The task model from the pretrained folder: the towers (and, for VQA, the fusion module) load their weights, a
    head over `labels` is new (or reused when the checkpoint has one of the same shape)."""
    model_class = (
        XModalForImageClassification if args.task == "image-classification" else XModalForVisualQuestionAnswering
    )
    id2label = dict(enumerate(labels))
    return model_class.from_pretrained(
        args.model,
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
        ignore_mismatched_sizes=True,
    )


def compute_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy of the argmax of `predictions` `(N, C)`: against `label_ids` `(N,)`, or, for soft VQA targets
    `(N, C)`, the target score of the predicted answer (the VQA accuracy)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.asarray(logits).argmax(axis=-1)
    targets = np.asarray(prediction.label_ids)
    if targets.ndim == 1:
        return {"accuracy": float((predicted == targets).mean())}
    return {"accuracy": float(targets[np.arange(len(predicted)), predicted].mean())}


def training_arguments(args: FinetuneArguments) -> TrainingArguments:
    """transformers `TrainingArguments` of the run: raw-column collators (remove_unused_columns=False), no reporting,
    no intermediate checkpoints (the folder is saved at the end), the CPU when there is no accelerator."""
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        optim=args.optim,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
    )


def build_trainer(args: FinetuneArguments) -> Trainer:
    """The `Trainer` of the run, with the data, the collator, the model (head initialised from `args.seed`) and the
    processor as `processing_class`."""
    config = XModalConfig.from_pretrained(args.model)
    processor = XModalProcessor.from_pretrained(args.model)
    train, eval_dataset, labels = load_finetune_data(args, config.vision_config.image_size)
    if args.task == "image-classification":
        collator = ImageClassificationCollator(
            processor,
            label2id={label: index for index, label in enumerate(labels)},
            image_column=args.image_column,
            label_column=args.label_column,
        )
    else:
        collator = VQACollator(
            processor,
            labels,
            max_length=args.max_length,
            image_column=args.image_column,
            question_column=args.question_column,
            answers_column=args.answers_column,
        )
    set_seed(args.seed)
    model = build_model(args, labels)
    return Trainer(
        model=model,
        args=training_arguments(args),
        data_collator=collator,
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=processor,
        compute_metrics=compute_accuracy,
    )


def finetune(args: FinetuneArguments) -> dict[str, Any]:
    """Fine-tunes, evaluates accuracy on the held-out split and saves a Hub-ready folder in `args.output_dir`.

    Returns:
        The metrics also written to `output_dir/metrics.json` (with the arguments): `task`, `num_labels`,
        `train_rows`, `eval_rows`, `train_steps`, `train_loss` (mean), `losses` (logged curve), `train_seconds`,
        `eval_loss`, `eval_accuracy` (VQA with soft targets: VQA accuracy).
    """
    trainer = build_trainer(args)
    train_output = trainer.train()
    eval_metrics = trainer.evaluate()
    model, processor = trainer.model, trainer.processing_class
    metrics: dict[str, Any] = {
        "task": args.task,
        "num_labels": model.config.num_labels,
        "train_rows": len(trainer.train_dataset),
        "eval_rows": len(trainer.eval_dataset),
        "train_steps": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "train_seconds": round(train_output.metrics["train_runtime"], 1),
        "eval_loss": eval_metrics["eval_loss"],
        "eval_accuracy": eval_metrics["eval_accuracy"],
    }
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({"arguments": asdict(args), **metrics}, handle, indent=2)
    return metrics


__all__ = [
    "TASKS",
    "FinetuneArguments",
    "ImageClassificationCollator",
    "VQACollator",
    "build_model",
    "build_trainer",
    "compute_accuracy",
    "finetune",
    "load_finetune_data",
    "training_arguments",
    "vqa_score",
]
