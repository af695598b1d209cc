"""Evaluation of image-text models with the package's local `evaluate` metric modules (`xmodal.training.metrics`):
retrieval Recall@K both ways (and ranks), prompt-based zero-shot classification top-1/top-5, VQA accuracy and
captioning BLEU-4 / CIDEr.

Work is sharded over the processes of an `Accelerator` when one is given; predictions are collected with
`gather_for_metrics` (which drops the samples repeated to even out the last batch), and every process returns the
same metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xmodal import (
    XModalConfig,
    XModalForConditionalGeneration,
    XModalForVisualQuestionAnswering,
    XModalModel,
    XModalProcessor,
)
from xmodal.training.data.pipeline import DataArguments
from xmodal.training.inference import check_templates, ensemble_text_embeddings
from xmodal.training.metrics import load_metric

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _compute(name: str, **inputs: Any) -> dict[str, Any]:
    return load_metric(name, keep_in_memory=True).compute(**inputs)


def retrieval_metrics(logits_per_text: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K of text->image and image->text retrieval, and the mean and median rank of the true match, for N
    paired items (text i belongs to image i), with the `retrieval_recall` metric module (ties count against the
    model: a collapsed model ranks last, not first).

    Args:
        logits_per_text (`torch.Tensor` of shape `(N, N)`): similarity of text i (row) with image j (column).

    Returns:
        `{"text_to_image_R@1": ..., "image_to_text_R@1": ..., "text_to_image_mean_rank": ..., ...}`, recalls in
        [0, 1] and ranks starting at 1.
    """
    if logits_per_text.ndim != 2 or logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise ValueError(
            f"retrieval_metrics needs a square (N, N) similarity matrix, got {tuple(logits_per_text.shape)}."
        )
    if not torch.isfinite(logits_per_text).all():
        raise ValueError("retrieval_metrics got non-finite similarities (a diverged model or NaN embeddings).")
    metrics: dict[str, float] = {}
    references = list(range(logits_per_text.shape[0]))
    for name, scores in (("text_to_image", logits_per_text), ("image_to_text", logits_per_text.t())):
        result = _compute("retrieval_recall", predictions=scores.float().tolist(), references=references, ks=ks)
        metrics.update({f"{name}_{key}": float(value) for key, value in result.items()})
    return metrics


@dataclass
class EvaluationTask:
    """What to evaluate beyond retrieval, on a paired image-text dataset.

    Args:
        class_names: zero-shot classes; None skips zero-shot.
        label_column: the column of each row's class: an index into `class_names`, or with `labels_are_names` a
            value whose `str()` is the class name.
        templates: prompt templates with `{}` for the class name (averaged as a prompt ensemble).
        answer_vocab: the VQA head's answers, for rows with `questions`/`answers` lists (the first question of each
            row is asked); None skips VQA.
        captioning: generate a caption per image and score it against the row's captions (`captions_column`, or
            `text`) with BLEU-4 and CIDEr-D.
    """

    class_names: Sequence[str] | None = None
    label_column: str = "label"
    labels_are_names: bool = False
    templates: Sequence[str] = ("a {}.",)
    answer_vocab: Sequence[str] | None = None
    captioning: bool = False
    captions_column: str | None = "captions"
    max_new_tokens: int = 24


class _EvalCollator:
    """Rows -> tensors of one evaluation batch; `index` `(B,)` identifies the rows after gathering."""

    def __init__(
        self,
        processor: XModalProcessor,
        max_length: int | None,
        task: EvaluationTask,
        image_column: str = "image",
        text_column: str = "text",
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.task = task
        self.image_column = image_column
        self.text_column = text_column

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.processor.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [text if isinstance(text, str) else text[0] for text in (row[self.text_column] for row in rows)]
        batch = {
            "index": torch.tensor([row["_index"] for row in rows]),
            "pixel_values": self.processor(images=[row[self.image_column] for row in rows], return_tensors="pt")[
                "pixel_values"
            ],
            **self._tokenize(texts),
        }
        if self.task.answer_vocab is not None:
            question = self._tokenize([row["questions"][0] for row in rows])
            batch["question_input_ids"] = question["input_ids"]
            batch["question_attention_mask"] = question["attention_mask"]
        return batch


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "_index": index}


def _task_model(model: XModalModel, head: type[XModalModel], config: XModalConfig) -> XModalModel:
    """A task head sharing the weights of `model` (parts are named alike in every xmodal head)."""
    task_model = head(config).to(model.device, model.dtype)
    missing, _ = task_model.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"{type(model).__name__} lacks the weights of {head.__name__}: {missing[:5]}...")
    return task_model.eval()


def _column(dataset: Dataset, name: str) -> list[Any]:
    """A column without running the dataset's decoding transform."""
    return list(dataset.with_format(None)[name])


def _pad_to(tokens: torch.Tensor, length: int, pad_token_id: int) -> torch.Tensor:
    return F.pad(tokens, (0, length - tokens.shape[1]), value=pad_token_id)


@torch.no_grad()
def _predict(
    model: XModalModel,
    loader: DataLoader,
    task: EvaluationTask,
    accelerator: Accelerator | None,
    show_progress: bool,
) -> dict[str, torch.Tensor]:
    """Per-row outputs, gathered over processes: embeddings, VQA answer indices, caption token ids."""
    config = model.config
    vqa = _task_model(model, XModalForVisualQuestionAnswering, config) if task.answer_vocab is not None else None
    captioner = _task_model(model, XModalForConditionalGeneration, config) if task.captioning else None
    pad_token_id = config.decoder_config.pad_token_id
    outputs: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc="evaluating", disable=not show_progress):
        batch = {key: value.to(model.device) for key, value in batch.items()}
        text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        step = {
            "index": batch["index"],
            "image_embeds": F.normalize(
                model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output.float(), dim=-1
            ),
            "text_embeds": F.normalize(model.get_text_features(**text).pooler_output.float(), dim=-1),
        }
        if vqa is not None:
            logits = vqa(
                input_ids=batch["question_input_ids"],
                attention_mask=batch["question_attention_mask"],
                pixel_values=batch["pixel_values"],
            ).logits
            step["vqa_answer"] = logits.argmax(dim=-1)
        if captioner is not None:
            tokens = captioner.generate(pixel_values=batch["pixel_values"], max_new_tokens=task.max_new_tokens)
            step["caption_ids"] = _pad_to(tokens, task.max_new_tokens + 1, pad_token_id)
        if accelerator is not None:
            step = accelerator.gather_for_metrics(step)
        for key, value in step.items():
            outputs.setdefault(key, []).append(value.cpu())
    gathered = {key: torch.cat(values) for key, values in outputs.items()}
    order = gathered["index"].argsort()
    return {key: value[order] for key, value in gathered.items()}


def evaluate_model(
    model: XModalModel,
    processor: XModalProcessor,
    dataset: Dataset,
    task: EvaluationTask | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 128,
    max_length: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluates a model on a paired image-text dataset (decoded rows with `image` and `text`).

    Always retrieval (every text against every image, both ways); with `task`, also zero-shot classification,
    VQA accuracy and captioning BLEU-4 / CIDEr-D. Keys: `text_to_image_R@1`, ..., `zero_shot_top1`,
    `zero_shot_top5`, `vqa_accuracy`, `captioning_bleu4`, `captioning_cider` (and `captioning_examples`: three
    (generated, reference) pairs).
    """
    if len(dataset) == 0:
        raise ValueError("evaluate_model got an empty dataset.")
    task = task or EvaluationTask()
    was_training = model.training
    model.eval()
    loader = DataLoader(
        _Indexed(dataset), batch_size=batch_size, collate_fn=_EvalCollator(processor, max_length, task)
    )
    if accelerator is not None:
        # shards of whole batches (any batch size, whatever the training run's split_batches)
        loader = prepare_data_loader(
            loader,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            split_batches=False,
            put_on_device=False,
        )
    # evaluation draws no random numbers from the training's RNG streams (resume stays exact with --eval_steps)
    with torch.random.fork_rng(devices=[]):
        predictions = _predict(model, loader, task, accelerator, show_progress)
        metrics = retrieval_metrics(predictions["text_embeds"] @ predictions["image_embeds"].t(), ks)
        if task.class_names is not None:
            classes = ensemble_text_embeddings(
                model, processor, task.class_names, task.templates, max_length=max_length
            ).to(predictions["image_embeds"])
            scores = predictions["image_embeds"] @ classes.t()
            labels = _column(dataset, task.label_column)
            if task.labels_are_names:
                index = {name: position for position, name in enumerate(task.class_names)}
                labels = [index[str(label)] for label in labels]
            result = _compute("zero_shot_accuracy", predictions=scores.tolist(), references=labels)
            metrics.update({f"zero_shot_{key}": float(value) for key, value in result.items()})
        if task.answer_vocab is not None:
            answers = [task.answer_vocab[index] for index in predictions["vqa_answer"].tolist()]
            references = [[row[0]] for row in _column(dataset, "answers")]
            metrics["vqa_accuracy"] = float(
                _compute("vqa_accuracy", predictions=answers, references=references)["accuracy"]
            )
        if task.captioning:
            captions = processor.batch_decode(predictions["caption_ids"], skip_special_tokens=True)
            column = task.captions_column if task.captions_column in dataset.column_names else "text"
            references = [[text] if isinstance(text, str) else list(text) for text in _column(dataset, column)]
            metrics["captioning_bleu4"] = float(_compute("bleu", predictions=captions, references=references)["bleu"])
            metrics["captioning_cider"] = float(
                _compute("cider", predictions=captions, references=references)["cider"]
            )
            metrics["captioning_examples"] = list(zip(captions[:3], [refs[0] for refs in references[:3]]))
    model.train(was_training)
    return metrics


def evaluation_task(
    args: DataArguments,
    evaluation: Dataset,
    answer_vocab: Sequence[str] | None = None,
    captioning: bool = False,
    max_new_tokens: int = 24,
) -> EvaluationTask:
    """What to evaluate besides retrieval: zero-shot classification when a label column is known
    (`--zero_shot_label_column`, `label` on the synthetic data), VQA with `answer_vocab`, captioning if asked."""
    label_column = args.zero_shot_label_column or ("label" if args.dataset == "synthetic" else None)
    class_names = None
    if label_column is not None:
        if label_column not in evaluation.column_names:
            raise ValueError(
                f"--zero_shot_label_column {label_column!r} is not a column of the evaluation data; columns: "
                f"{evaluation.column_names}."
            )
        feature = evaluation.features[label_column]
        values = evaluation.with_format(None)[label_column]
        class_names = feature.names if hasattr(feature, "names") else sorted({str(value) for value in values})
    return EvaluationTask(
        class_names=class_names,
        label_column=label_column or "label",
        labels_are_names=label_column is not None and not hasattr(evaluation.features[label_column], "names"),
        templates=check_templates(args.zero_shot_templates.split("|")),
        answer_vocab=answer_vocab,
        captioning=captioning,
        max_new_tokens=max_new_tokens,
    )


@torch.no_grad()
def embed_dataset(
    model: XModalModel,
    processor: XModalProcessor,
    dataset: Dataset,
    image_column: str = "image",
    text_column: str = "text",
    batch_size: int = 128,
    max_length: int | None = None,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings of every row (its first caption when it has several), each
    `(len(dataset), projection_dim)`."""
    collator = _EvalCollator(processor, max_length, EvaluationTask(), image_column, text_column)
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, collate_fn=collator)
    predictions = _predict(model.eval(), loader, EvaluationTask(), None, show_progress)
    return predictions["image_embeds"], predictions["text_embeds"]


def evaluate_retrieval(
    model: XModalModel,
    processor: XModalProcessor,
    dataset: Dataset,
    ks: Sequence[int] = DEFAULT_KS,
    **kwargs: Any,
) -> dict[str, float]:
    """Text->image and image->text Recall@K (and mean/median rank) of a paired image-text dataset."""
    return {
        key: value
        for key, value in evaluate_model(model, processor, dataset, ks=ks, **kwargs).items()
        if key.startswith(("text_to_image", "image_to_text"))
    }


__all__ = [
    "DEFAULT_KS",
    "EvaluationTask",
    "embed_dataset",
    "evaluate_model",
    "evaluate_retrieval",
    "evaluation_task",
    "retrieval_metrics",
]
