"""Fine-tuning a pretrained xmodal model with transformers' `Trainer`, one recipe per task:

- `image-classification`: `XModalForImageClassification`, a new linear head on the image tower;
- `vqa`: `XModalForVisualQuestionAnswering`, classification over an answer vocabulary;
- `retrieval`: contrastive fine-tuning of the dual encoder (`XModalModel`) on image-caption pairs, with InfoNCE over the
  global batch when several processes train (`ContrastiveTrainer`), scored by Recall@K both ways;
- `captioning`: `XModalForConditionalGeneration`, next-token loss on the captions, scored by BLEU-4 and CIDEr-D of
  greedy captions.

`finetune(FinetuneArguments(...))` reads like the recipe: data -> processor and collator -> the task model (with LoRA
adapters on the attention projections when `lora_r > 0`, through `peft`) -> `Trainer` -> held-out metrics -> a
Hub-ready folder (weights, processor, remote code, metrics.json; with LoRA also the adapter alone in `adapter/`).
By default it trains on the embedded procedural data: `label` (the shape of the largest object) for classification,
every `questions`/`answers` pair for VQA (answers in `xmodal.training.data.ANSWER_VOCAB`), the `captions` of each scene
(one drawn per row and step) for retrieval and captioning.

```bash
xmodal finetune --task image-classification --model outputs/xmodal-tiny --output_dir outputs/classifier
xmodal finetune --task vqa --model outputs/xmodal-tiny --output_dir outputs/vqa
xmodal finetune --task retrieval --model outputs/xmodal-tiny --output_dir outputs/retrieval
xmodal finetune --task captioning --model outputs/xmodal-tiny --output_dir outputs/captioner
xmodal finetune --task retrieval --dataset my_pairs --caption_column caption --model outputs/xmodal-tiny
xmodal finetune --task image-classification --lora_r 8 --learning_rate 1e-3 --model outputs/xmodal-tiny
accelerate launch --multi_gpu --num_processes 2 -m xmodal.training.cli finetune --task retrieval --model ...
```
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from torch import nn
from transformers import (
    EvalPrediction,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from xmodal import (
    XModalConfig,
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForVisualQuestionAnswering,
    XModalModel,
    XModalProcessor,
)
from xmodal.training.data import ANSWER_VOCAB, SHAPES, make_synthetic_dataset
from xmodal.training.data.sources import _pick_caption
from xmodal.training.evaluation import evaluate_model
from xmodal.training.inference import load_image
from xmodal.training.losses import ContrastiveLoss
from xmodal.training.metrics import load_metric

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

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


class RetrievalCollator:
    """Turns rows `{"image": PIL image or path, "text": a caption or a list of captions}` into contrastive `XModalModel`
    inputs with the processor: `pixel_values` `(B, 3, H, W)`, the tokenized captions `input_ids`/`attention_mask`
    `(B, L)` (image i is paired with caption i) and `return_loss=True`. A row with several captions contributes one,
    drawn with torch's RNG (seeded by Trainer), so every caption is seen over the epochs.

    Args:
        processor: the model's `XModalProcessor`.
        max_length: longest caption in tokens (default: the tokenizer's `model_max_length`).
        image_column, text_column: the columns read from each row.
    """

    def __init__(
        self,
        processor: XModalProcessor,
        max_length: int | None = None,
        image_column: str = "image",
        text_column: str = "text",
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.image_column = image_column
        self.text_column = text_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = dict(
            self.processor(
                images=[load_image(row[self.image_column]) for row in rows],
                text=[_pick_caption(row[self.text_column]) for row in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        # Trainer computes an evaluation loss without `labels` only when the batch asks for it
        batch["return_loss"] = True
        return batch


class CaptioningCollator:
    """Turns rows `{"image": PIL image or path, "text": a caption or a list of captions}` into
    `XModalForConditionalGeneration` inputs: `pixel_values` `(B, 3, H, W)`; `input_ids` `(B, L)`, the tokenized caption
    (one drawn per row when there are several), which starts with the decoder's BOS ([CLS]) and ends with its EOS
    ([SEP]), right-padded; `attention_mask` `(B, L)`; and `labels` `(B, L)`, `input_ids` with the padding set to -100
    (the model trains position t to predict label t + 1, so the EOS is learned and the BOS never predicted).

    Args:
        processor: the model's `XModalProcessor`.
        max_length: longest caption in tokens, BOS and EOS included (at most the decoder's `max_position_embeddings`).
        bos_token_id: the decoder's BOS id (`config.decoder_config.bos_token_id`); when given, every tokenized caption
            must start with it.
        image_column, text_column: the columns read from each row.
    """

    def __init__(
        self,
        processor: XModalProcessor,
        max_length: int | None = None,
        bos_token_id: int | None = None,
        image_column: str = "image",
        text_column: str = "text",
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.bos_token_id = bos_token_id
        self.image_column = image_column
        self.text_column = text_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [load_image(row[self.image_column]) for row in rows]
        tokens = self.processor.tokenizer(
            [_pick_caption(row[self.text_column]) for row in rows],
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        if self.bos_token_id is not None and not bool((input_ids[:, 0] == self.bos_token_id).all()):
            raise ValueError(
                f"The tokenizer does not start captions with the decoder's BOS id {self.bos_token_id} (got first ids "
                f"{input_ids[:, 0].tolist()}): use the tokenizer the model was pretrained with."
            )
        return {
            "pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }


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


def _caption_rows(dataset: Dataset, image_column: str, caption_column: str) -> Dataset:
    """The image-caption pairs as the columns `image` (decoded: image paths are read as files) and `text` (one
    caption or a list), what the collators and `evaluate_model` read."""
    rows = dataset.select_columns(list(dict.fromkeys([image_column, caption_column])))
    renames = {old: new for old, new in ((image_column, "image"), (caption_column, "text")) if old != new}
    if renames:
        rows = rows.rename_columns(renames)
    if rows.features["image"] == Value("string"):
        rows = rows.cast_column("image", ImageFeature())
    return rows


def load_finetune_data(args: FinetuneArguments, image_size: int) -> tuple[Dataset, Dataset, list[str]]:
    """The training and held-out rows (capped at --max_train_samples / --max_eval_samples) and the class names (VQA:
    the answer vocabulary; retrieval and captioning: none), from --dataset or the procedural data drawn at
    `image_size`. Retrieval and captioning rows come as the columns `image` and `text` (--caption_column)."""
    classification = args.task == "image-classification"
    if args.dataset is None:
        train, eval_dataset = _synthetic_splits(args, image_size)
    else:
        train, eval_dataset = _dataset_splits(args)
    if args.task in CAPTION_TASKS:
        needed = [args.image_column, args.caption_column]
    elif classification:
        needed = [args.image_column, args.label_column]
    else:
        needed = [args.image_column, args.question_column, args.answers_column]
    for name, split in (("training", train), ("held-out", eval_dataset)):
        missing = [column for column in needed if column not in split.column_names]
        if missing:
            raise ValueError(
                f"The {name} rows lack the columns {missing} (columns: {', '.join(split.column_names)}); "
                "see --image_column, --label_column, --question_column, --answers_column, --caption_column."
            )
    if args.task in CAPTION_TASKS:
        labels: list[str] = []
        train = _caption_rows(train, args.image_column, args.caption_column)
        eval_dataset = _caption_rows(eval_dataset, args.image_column, args.caption_column)
    elif args.dataset is None:
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
# LoRA
# ----------------------------------------------------------------------------------------------------------------

ATTENTION_PROJECTIONS: tuple[str, ...] = ("qkv_proj", "q_proj", "kv_proj", "out_proj")
"""The `nn.Linear` projections of `XModalAttention`: the fused query-key-value projection of self-attention, the query
and fused key-value projections of cross-attention, and the output projection."""


def lora_target_modules(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Full names of the attention projections (`ATTENTION_PROJECTIONS`) of `model`, in module order, leaving out those
    inside the modules named in `exclude` (e.g. `"cross_model"`): `peft.LoraConfig(target_modules=...)`.

    For an `XModalForImageClassification` with one layer: `["vision_model.encoder.layers.0.self_attn.qkv_proj",
    "vision_model.encoder.layers.0.self_attn.out_proj"]`.
    """
    excluded = tuple(f"{name}." for name in exclude)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
        and not f"{name}.".startswith(excluded)
    ]


def apply_lora(
    model: PreTrainedModel,
    r: int,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> PeftModel:
    """Wraps `model` with `peft` LoRA adapters of rank `r` on its attention projections (`lora_target_modules`) and
    freezes every other weight, except the modules named in `modules_to_save` (e.g. a new `classifier`), which train
    in full and are saved with the adapter. Modules in `exclude` (and in `modules_to_save`) get no adapter.

    `model.save_pretrained(folder)` then writes the adapter alone (`adapter_config.json`,
    `adapter_model.safetensors`); `peft.PeftModel.from_pretrained(base, folder)` puts it back on a freshly loaded base
    and `merge_and_unload()` folds it into the weights.

    Raises:
        ImportError: peft is not installed.
        ValueError: `r` < 1, or no attention projection is left to adapt.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'xmodal[peft]' (or pip install peft).") from err
    if r < 1:
        raise ValueError(f"The LoRA rank r must be at least 1, got {r}.")
    targets = lora_target_modules(model, exclude=[*exclude, *modules_to_save])
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no attention projection ({', '.join(ATTENTION_PROJECTIONS)}) outside "
            f"{[*exclude, *modules_to_save]} to put LoRA adapters on."
        )
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        modules_to_save=list(modules_to_save) or None,
    )
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------------------
# Model, Trainer, recipe
# ----------------------------------------------------------------------------------------------------------------


def _new_modules(loading_info: Mapping[str, Any]) -> set[str]:
    """The top-level modules with weights the checkpoint did not provide (missing, or of another shape)."""
    keys = [*loading_info["missing_keys"], *loading_info["mismatched_keys"]]
    return {(key if isinstance(key, str) else key[0]).split(".")[0] for key in keys}


def build_model(args: FinetuneArguments, labels: Sequence[str]) -> PreTrainedModel | PeftModel:
    """The task model (`TASK_MODELS`) from the pretrained folder: the parts the checkpoint holds load their weights; a
    classification or VQA head over `labels` is new (or reused when the checkpoint has one of the same shape), as is
    the captioning decoder of a checkpoint pretrained without one. Retrieval freezes the fusion module, which the
    contrastive loss does not use.

    With `args.lora_r > 0`, `apply_lora` wraps the model: adapters on the attention projections of the pretrained
    parts; the task head (`TASK_HEADS`) and the modules the checkpoint lacks train in full.

    Raises:
        ValueError: LoRA on a checkpoint without the captioning decoder (new and tied to the output layer, it cannot
            train in full beside the adapters: fine-tune it with `lora_r=0` first).
    """
    options: dict[str, Any] = {}
    if args.task in ("image-classification", "vqa"):
        id2label = dict(enumerate(labels))
        options = {
            "id2label": id2label,
            "label2id": {label: index for index, label in id2label.items()},
            "ignore_mismatched_sizes": True,
        }
    model, loading_info = TASK_MODELS[args.task].from_pretrained(args.model, output_loading_info=True, **options)
    if args.task == "retrieval" and model.cross_model is not None:
        model.cross_model.requires_grad_(False)
    if args.lora_r == 0:
        return model
    new_modules = _new_modules(loading_info)
    tied = {name.split(".")[0] for pair in (model._tied_weights_keys or {}).items() for name in pair}
    if tied & new_modules:
        raise ValueError(
            f"--lora_r: {args.model} has no pretrained {', '.join(sorted(tied & new_modules))} for {args.task}; "
            "fine-tune it in full first (--lora_r 0), then train LoRA adapters on that folder."
        )
    return apply_lora(
        model,
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        modules_to_save=sorted(new_modules | set(TASK_HEADS[args.task])),
        exclude=("cross_model",) if args.task == "retrieval" else (),
    )


class ClampLogitScale(TrainerCallback):
    """Clamps the logit scale parameter into [0, log(max_logit_scale)] after every optimizer step, as CLIP's training
    does: the forward pass clamps too, but a parameter left past the bound would get no gradient and stay stuck."""

    def on_step_end(
        self, args: TrainingArguments, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        model = getattr(model, "module", model)
        logit_scale = getattr(model, "logit_scale", None)
        if isinstance(logit_scale, torch.Tensor):
            with torch.no_grad():
                logit_scale.clamp_(0, math.log(model.config.max_logit_scale))


class ContrastiveTrainer(Trainer):
    """`Trainer` for contrastive fine-tuning of the dual encoder (`XModalModel`, batches from `RetrievalCollator`).

    On one process the loss is the model's own: InfoNCE over the batch (or SigLIP, as configured). On several
    processes (DDP), InfoNCE runs over the global batch: `xmodal.training.losses.ContrastiveLoss` gathers every
    process's embeddings with their gradients, so N processes with B pairs each learn like one process with N x B
    pairs (open_clip). The SigLIP loss stays per process. Gradient accumulation does not enlarge the contrastive
    batch: each micro-batch holds its own negatives.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(ClampLogitScale())
        config = self.model.config
        self.global_loss: ContrastiveLoss | None = None
        if self.args.world_size > 1:
            if config.contrastive_loss_type == "nt_xent":
                self.global_loss = ContrastiveLoss(config.label_smoothing)
            else:
                logger.warning(
                    f"The {config.contrastive_loss_type} loss is computed within each process's batch of "
                    f"{self.args.per_device_train_batch_size} pairs; only InfoNCE (nt_xent) gathers the global batch."
                )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's loss, or with several processes, InfoNCE of this process's pairs against the global batch."""
        if self.global_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{**inputs, "return_loss": False})
        logit_scale = self.accelerator.unwrap_model(model).clamped_logit_scale()
        loss = self.global_loss(outputs.image_embeds, outputs.text_embeds, logit_scale)
        return (loss, outputs) if return_outputs else loss


def compute_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy of the argmax of `predictions` `(N, C)`: against `label_ids` `(N,)`, or, for soft VQA targets
    `(N, C)`, the target score of the predicted answer (the VQA accuracy)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.asarray(logits).argmax(axis=-1)
    targets = np.asarray(prediction.label_ids)
    if targets.ndim == 1:
        return {"accuracy": float((predicted == targets).mean())}
    return {"accuracy": float(targets[np.arange(len(predicted)), predicted].mean())}


@torch.no_grad()
def generate_captions(
    model: XModalForConditionalGeneration,
    processor: XModalProcessor,
    dataset: Dataset,
    image_column: str = "image",
    batch_size: int = 64,
    max_new_tokens: int = 24,
    accelerator: Accelerator | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """A caption for every image of `dataset`, in row order, decoded without special tokens: greedy, unless
    `generate_kwargs` (`num_beams`, `do_sample`, ...) say otherwise. With an `Accelerator` of several processes, each
    captions a contiguous share of the rows and every process returns all the captions."""
    state = accelerator if accelerator is not None else PartialState()
    was_training = model.training
    model.eval()
    captions: list[str] = []
    with state.split_between_processes(list(range(len(dataset)))) as indices:
        for start in range(0, len(indices), batch_size):
            images = [load_image(image) for image in dataset[indices[start : start + batch_size]][image_column]]
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
            tokens = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, **generate_kwargs)
            captions.extend(processor.batch_decode(tokens, skip_special_tokens=True))
    model.train(was_training)
    return gather_object(captions)


def captioning_metrics(captions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D (the local `bleu` and `cider` metric modules) of `captions` against each one's
    reference caption or captions: `{"bleu4": ..., "cider": ...}`."""
    if len(captions) != len(references):
        raise ValueError(f"Got {len(captions)} captions for {len(references)} sets of references.")
    refs = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
    inputs = {"predictions": list(captions), "references": refs}
    return {
        "bleu4": float(load_metric("bleu", keep_in_memory=True).compute(**inputs)["bleu"]),
        "cider": float(load_metric("cider", keep_in_memory=True).compute(**inputs)["cider"]),
    }


def training_arguments(args: FinetuneArguments) -> TrainingArguments:
    """transformers `TrainingArguments` of the run: raw-column collators (remove_unused_columns=False), no reporting,
    no intermediate checkpoints (the folder is saved at the end), the CPU when there is no accelerator. Retrieval
    batches have no `labels`: they ask for the contrastive loss with `return_loss`; every trainable weight of
    retrieval is used (the fusion module is frozen), so DDP skips its search for unused ones."""
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
        label_names=[] if args.task == "retrieval" else ["labels"],
        ddp_find_unused_parameters=False if args.task == "retrieval" else None,
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
    )


def caption_length(args: FinetuneArguments, processor: XModalProcessor, config: XModalConfig) -> int:
    """The longest captioning sequence in tokens (BOS and EOS included): --max_length, else the tokenizer's
    `model_max_length`, at most the decoder's `max_position_embeddings`."""
    positions = config.decoder_config.max_position_embeddings
    if args.max_length is not None and args.max_length > positions:
        raise ValueError(
            f"--max_length {args.max_length} exceeds the captioning decoder's max_position_embeddings ({positions})."
        )
    return args.max_length or min(processor.tokenizer.model_max_length, positions)


def build_collator(
    args: FinetuneArguments, processor: XModalProcessor, config: XModalConfig, labels: Sequence[str]
) -> ImageClassificationCollator | VQACollator | RetrievalCollator | CaptioningCollator:
    """The collator of `args.task` (retrieval and captioning read the `image`/`text` rows of `load_finetune_data`)."""
    if args.task == "image-classification":
        return ImageClassificationCollator(
            processor,
            label2id={label: index for index, label in enumerate(labels)},
            image_column=args.image_column,
            label_column=args.label_column,
        )
    if args.task == "vqa":
        return VQACollator(
            processor,
            labels,
            max_length=args.max_length,
            image_column=args.image_column,
            question_column=args.question_column,
            answers_column=args.answers_column,
        )
    if args.task == "retrieval":
        return RetrievalCollator(processor, max_length=args.max_length)
    return CaptioningCollator(
        processor,
        max_length=caption_length(args, processor, config),
        bos_token_id=config.decoder_config.bos_token_id,
    )


def build_trainer(args: FinetuneArguments) -> Trainer:
    """The `Trainer` of the run (`ContrastiveTrainer` for retrieval), with the data, the collator, the model (new
    modules initialised from `args.seed`) and the processor as `processing_class`."""
    config = XModalConfig.from_pretrained(args.model)
    processor = XModalProcessor.from_pretrained(args.model)
    train, eval_dataset, labels = load_finetune_data(args, config.vision_config.image_size)
    collator = build_collator(args, processor, config, labels)
    set_seed(args.seed)
    model = build_model(args, labels)
    trainer_class = ContrastiveTrainer if args.task == "retrieval" else Trainer
    return trainer_class(
        model=model,
        args=training_arguments(args),
        data_collator=collator,
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=processor,
        compute_metrics=compute_accuracy if args.task in ("image-classification", "vqa") else None,
    )


def _held_out_metrics(args: FinetuneArguments, trainer: Trainer, model: PreTrainedModel) -> dict[str, Any]:
    """Retrieval: Recall@K both ways and the ranks (`evaluate_model`, first caption of each row); captioning: BLEU-4,
    CIDEr-D and three (generated, reference) examples of greedy captions; keys prefixed with `eval_`."""
    processor, rows = trainer.processing_class, trainer.eval_dataset
    if args.task == "retrieval":
        metrics = evaluate_model(
            model,
            processor,
            rows,
            accelerator=trainer.accelerator,
            batch_size=args.eval_batch_size,
            max_length=args.max_length,
            show_progress=False,
        )
        return {f"eval_{key}": value for key, value in metrics.items()}
    max_new_tokens = args.max_new_tokens or caption_length(args, processor, model.config) - 1
    captions = generate_captions(
        model,
        processor,
        rows,
        batch_size=args.eval_batch_size,
        max_new_tokens=max_new_tokens,
        accelerator=trainer.accelerator,
    )
    references = list(rows.with_format(None)["text"])
    scores = captioning_metrics(captions, references)
    first = [reference if isinstance(reference, str) else reference[0] for reference in references[:3]]
    return {
        "eval_bleu4": scores["bleu4"],
        "eval_cider": scores["cider"],
        "eval_examples": [list(pair) for pair in zip(captions[:3], first)],
    }


def finetune(args: FinetuneArguments) -> dict[str, Any]:
    """Fine-tunes, evaluates on the held-out split and saves a Hub-ready folder in `args.output_dir` (with LoRA: the
    adapters merged into the weights, and the adapter alone in `output_dir/adapter`). Under several processes, each
    process returns the metrics and the first one writes the folder.

    Returns:
        The metrics also written to `output_dir/metrics.json` (with the arguments): `task`, `train_rows`,
        `eval_rows`, `train_steps`, `train_loss` (mean), `losses` (logged curve), `train_seconds`, `eval_loss`, and
        by task: `num_labels` and `eval_accuracy` (image classification, VQA: the VQA accuracy with soft targets);
        `eval_text_to_image_R@1`, ..., `eval_image_to_text_R@10`, the mean and median ranks (retrieval);
        `eval_bleu4`, `eval_cider`, `eval_examples` (captioning); `trainable_parameters` with LoRA.
    """
    trainer = build_trainer(args)
    train_output = trainer.train()
    eval_metrics = trainer.evaluate()
    model, processor = trainer.model, trainer.processing_class
    is_main = trainer.is_world_process_zero()
    metrics: dict[str, Any] = {
        "task": args.task,
        "train_rows": len(trainer.train_dataset),
        "eval_rows": len(trainer.eval_dataset),
        "train_steps": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "train_seconds": round(train_output.metrics["train_runtime"], 1),
        "eval_loss": eval_metrics["eval_loss"],
    }
    if args.lora_r:
        metrics["trainable_parameters"] = sum(param.numel() for param in model.parameters() if param.requires_grad)
        if is_main:
            model.save_pretrained(os.path.join(args.output_dir, ADAPTER_FOLDER))
        model = model.merge_and_unload()
    if args.task in CAPTION_TASKS:
        metrics.update(_held_out_metrics(args, trainer, model))
    else:
        metrics["num_labels"] = model.config.num_labels
        metrics["eval_accuracy"] = eval_metrics["eval_accuracy"]
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump({"arguments": asdict(args), **metrics}, handle, indent=2)
    trainer.accelerator.wait_for_everyone()
    return metrics


def summarize_metrics(task: str, metrics: Mapping[str, Any]) -> str:
    """What `xmodal finetune` prints: the held-out result of `task` (one of `TASKS`) and the mean training loss."""
    rows = metrics["eval_rows"]
    if task == "retrieval":
        directions = []
        for direction, name in (("text_to_image", "text->image"), ("image_to_text", "image->text")):
            prefix = f"eval_{direction}_R@"
            recalls = [
                f"R@{key[len(prefix) :]} {100 * value:.1f}%"
                for key, value in metrics.items()
                if key.startswith(prefix)
            ]
            directions.append(f"{name} {', '.join(recalls)}")
        headline = f"Held-out retrieval ({rows} pairs): {'; '.join(directions)}"
    elif task == "captioning":
        headline = (
            f"Held-out captioning ({rows} images, greedy): BLEU-4 {metrics['eval_bleu4']:.3f}, "
            f"CIDEr-D {metrics['eval_cider']:.3f}"
        )
    else:
        headline = f"Held-out accuracy ({task}, {rows} rows): {100 * metrics['eval_accuracy']:.1f}%"
    return f"{headline}\nMean training loss {metrics['train_loss']:.3f} over {metrics['train_steps']} steps"


__all__ = [
    "ADAPTER_FOLDER",
    "ATTENTION_PROJECTIONS",
    "CAPTION_TASKS",
    "TASKS",
    "TASK_HEADS",
    "TASK_MODELS",
    "CaptioningCollator",
    "ContrastiveTrainer",
    "FinetuneArguments",
    "ImageClassificationCollator",
    "RetrievalCollator",
    "VQACollator",
    "apply_lora",
    "build_collator",
    "build_model",
    "build_trainer",
    "caption_length",
    "captioning_metrics",
    "compute_accuracy",
    "finetune",
    "generate_captions",
    "load_finetune_data",
    "lora_target_modules",
    "summarize_metrics",
    "training_arguments",
    "vqa_score",
]
