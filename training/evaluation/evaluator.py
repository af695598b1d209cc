"""Evaluation of image-text models with the package's local `evaluate` metric modules (`xmodal.training.evaluation.metrics`):
retrieval Recall@K both ways (and ranks), prompt-based zero-shot classification top-1/top-5, image-text matching
accuracy, VQA accuracy and captioning BLEU-4 / CIDEr.

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
    XModalForImageTextRetrieval,
    XModalForVisualQuestionAnswering,
    XModalModel,
    XModalProcessor,
)
from xmodal.training.data.pipeline import DataArguments
from xmodal.training.evaluation.metrics import load_metric
from xmodal.training.inference.zero_shot import check_templates, ensemble_text_embeddings

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
        `{"text_to_image_R@1": ..., "image_to_text_R@1": ..., "text_to_image_mean_rank": ..., ...,
        "mean_recall": ...}`, recalls in [0, 1] and ranks starting at 1; `mean_recall` is the mean of every R@K of
        both directions (the "rsum" of the retrieval literature divided by its number of terms), the default metric
        for selecting the best model.
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
    recalls = [metrics[f"{name}_R@{k}"] for name in ("text_to_image", "image_to_text") for k in ks]
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    return metrics


def _in_batch_negatives(
    input_ids: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each image j of a batch, a random other text ((j + 1) mod B) and the hardest other text (the highest
    contrastive similarity, as ALBEF samples its ITM negatives); a text identical to image j's own caption is never
    its negative. Returns `(random_index, hard_index, valid)`, each `(2, B)` stacked as (random, hard) for `valid`."""
    batch_size = input_ids.shape[0]
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1)  # (B, B), true on the diagonal
    similarity = (text_embeds @ image_embeds.t()).t().masked_fill(same_text, float("-inf"))  # (images, texts)
    hard = similarity.argmax(dim=1)
    shifted = torch.arange(batch_size, device=input_ids.device).roll(-1)
    images = torch.arange(batch_size, device=input_ids.device)
    valid = torch.stack([~same_text[images, shifted], torch.isfinite(similarity.max(dim=1).values)])
    return shifted, hard, valid


@torch.no_grad()
def _itm_log_odds(
    model: XModalForImageTextRetrieval, batch: dict[str, torch.Tensor], step: dict[str, torch.Tensor]
) -> torch.Tensor:
    """ITM log-odds (match minus no-match logit) `(B, 3)` of each image with its own caption, a random other caption
    and its hardest in-batch negative; NaN where a batch has no valid negative (see `_in_batch_negatives`)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    shifted, hard, valid = _in_batch_negatives(input_ids, step["image_embeds"], step["text_embeds"])
    image = model._encode_image(batch["pixel_values"]).last_hidden_state
    text = model._encode_text(input_ids, attention_mask).last_hidden_state
    images = torch.arange(input_ids.shape[0], device=input_ids.device)
    text_index = torch.cat([images, shifted, hard])
    fused = model.fuse(image, text[text_index], attention_mask[text_index], image_index=images.repeat(3))
    prior = model.pair_logits(step["image_embeds"].repeat(3, 1), step["text_embeds"][text_index])
    logits = model.itm_head(fused.pooler_output, prior).float()
    log_odds = (logits[:, 1] - logits[:, 0]).reshape(3, -1)
    log_odds[1:] = log_odds[1:].masked_fill(~valid, float("nan"))
    return log_odds.t()


def itm_metrics(log_odds: torch.Tensor) -> dict[str, float]:
    """Held-out image-text matching quality from `(N, 3)` ITM log-odds of (matched, random mismatched, hardest
    in-batch mismatched) pairs, NaN marking a missing negative.

    Returns:
        `itm_accuracy`: balanced accuracy over matched and random mismatched pairs (chance 0.5);
        `itm_hard_accuracy`: the same with the hard negatives, the harder test ALBEF trains for;
        `itm_auc`: the probability that a matched pair scores above a mismatched one (random and hard negatives).
    """
    if log_odds.ndim != 2 or log_odds.shape[1] != 3:
        raise ValueError(f"itm_metrics needs (N, 3) log-odds, got {tuple(log_odds.shape)}.")
    positives = log_odds[:, 0]
    metrics: dict[str, float] = {}
    for name, negatives in (("itm_accuracy", log_odds[:, 1]), ("itm_hard_accuracy", log_odds[:, 2])):
        negatives = negatives[~negatives.isnan()]
        if len(negatives) == 0:
            raise ValueError("itm_metrics got no mismatched pairs (every evaluation batch had one distinct text).")
        metrics[name] = 0.5 * ((positives > 0).float().mean() + (negatives < 0).float().mean()).item()
    negatives = log_odds[:, 1:].flatten()
    negatives = negatives[~negatives.isnan()]
    # AUC as the Mann-Whitney statistic, ties counted half
    wins = (positives[:, None] > negatives[None, :]).float() + 0.5 * (positives[:, None] == negatives[None, :]).float()
    metrics["itm_auc"] = wins.mean().item()
    return metrics


@dataclass
class EvaluationTask:
    """What to evaluate beyond retrieval, on a paired image-text dataset.

    Args:
        class_names: zero-shot classes; None skips zero-shot.
        label_column: the column of each row's class: an index into `class_names`, or with `labels_are_names` a
            value whose `str()` is the class name.
        templates: prompt templates with `{}` for the class name (averaged as a prompt ensemble).
        itm: score each image with its caption, a random other caption and its hardest in-batch negative with the
            ITM head (`itm_metrics`); the model must have one (pretrained with ITM).
        answer_vocab: the VQA head's answers, for rows with `questions`/`answers` lists (the first question of each
            row is asked); None skips VQA.
        captioning: generate a caption per image and score it against the row's captions (`captions_column`, or
            `text`) with BLEU-4 and CIDEr-D.
    """

    class_names: Sequence[str] | None = None
    label_column: str = "label"
    labels_are_names: bool = False
    templates: Sequence[str] = ("a {}.",)
    itm: bool = False
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
    matcher = _task_model(model, XModalForImageTextRetrieval, config) if task.itm else None
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
        if matcher is not None:
            step["itm_log_odds"] = _itm_log_odds(matcher, batch, step)
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
    ITM accuracy, VQA accuracy and captioning BLEU-4 / CIDEr-D. Keys: `text_to_image_R@1`, ..., `mean_recall`,
    `zero_shot_top1`, `zero_shot_top5`, `itm_accuracy`, `itm_hard_accuracy`, `itm_auc`, `vqa_accuracy`, `captioning_bleu4`, `captioning_cider` (and `captioning_examples`: three
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
        if task.itm:
            metrics.update(itm_metrics(predictions["itm_log_odds"]))
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
    itm: bool = False,
) -> EvaluationTask:
    """What to evaluate besides retrieval: zero-shot classification when a label column is known
    (`--zero_shot_label_column`, `label` on the synthetic data), ITM, VQA with `answer_vocab`, captioning if
    asked."""
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
        itm=itm,
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
    "itm_metrics",
    "retrieval_metrics",
]
