"""The data of each fine-tuning task: the embedded procedural splits or a user dataset (a `datasets` folder, Hub
id or loading script), the label and answer vocabularies, and one collator per task that feeds the processor's
tensors to the task model.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature

from xmodal import XModalProcessor
from xmodal.training.data import ANSWER_VOCAB, SHAPES, make_synthetic_dataset
from xmodal.training.data.sources import _pick_caption
from xmodal.training.inference.embeddings import load_image

if TYPE_CHECKING:
    pass
from xmodal.training.transfer.finetune_arguments import CAPTION_TASKS, FinetuneArguments


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


__all__ = [
    "ATTENTION_PROJECTIONS",
    "CaptioningCollator",
    "ImageClassificationCollator",
    "RetrievalCollator",
    "VQACollator",
    "load_finetune_data",
    "vqa_score",
]
