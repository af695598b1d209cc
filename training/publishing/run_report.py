"""The published report of a pretraining run: metrics.json, the retrieval example picture and the model card, with
local paths reduced to base names; and the run's summary tables for the terminal."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from datasets import Dataset

from xmodal import XModalModel, XModalProcessor
from xmodal.training.data.webdataset import is_webdataset_source
from xmodal.training.publishing.cards import RETRIEVAL_EXAMPLE_FILE, write_model_card
from xmodal.training.publishing.plots import plot_retrieval_example

if TYPE_CHECKING:
    from xmodal.training.pretraining.arguments import PretrainArguments


def write_run_report(
    model: XModalModel,
    processor: XModalProcessor,
    args: PretrainArguments,
    metrics: dict[str, Any],
    evaluation: Dataset,
) -> None:
    """Completes the Hub-ready folder (which already holds the weights, config, processor files and remote-code
    bundle): metrics.json, the loss curve, a retrieval example picture (top 5 images for the first evaluation
    caption) and the model card."""
    with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump({"arguments": public_arguments(args), **_public_metrics(metrics, args)}, handle, indent=2)
    plot_retrieval_example(
        model,
        processor,
        evaluation,
        os.path.join(args.output_dir, RETRIEVAL_EXAMPLE_FILE),
        batch_size=args.eval_batch_size,
        max_length=args.max_length,
        show_progress=False,
    )
    synthetic = args.dataset == "synthetic"
    if synthetic:
        dataset_name, dataset_type = "the xmodal procedural scenes (embedded)", "synthetic"
    elif _is_local(args.dataset):
        # local data is named by its base name: the card goes public, the local path means nothing there
        dataset_name, dataset_type = _public_name(args.dataset), "local"
    else:
        dataset_name = dataset_type = args.dataset
    write_model_card(
        args.output_dir,
        model.config,
        metrics,
        dataset_name=dataset_name,
        dataset_type=dataset_type,
        base_model=_base_model(args.text_tower),
        training_arguments=public_arguments(args),
        num_parameters=model.num_parameters(),
    )


_PATH_OPTIONS = ("output_dir", "dataset", "tokenizer", "text_tower")


def _is_local(value: str) -> bool:
    """An existing path, or a pattern of local WebDataset shards."""
    return os.path.exists(value) or is_webdataset_source(value)


def _public_name(value: str) -> str:
    """A local path's base name; for a shard pattern, each pattern's folder name and file pattern
    (`/data/cc3m/{00000..00331}.tar` -> `cc3m/{00000..00331}.tar`)."""
    if os.path.exists(value):
        return os.path.basename(os.path.normpath(value))
    parts = [
        os.path.join(os.path.basename(os.path.dirname(part)), os.path.basename(part)) for part in value.split("::")
    ]
    return "::".join(parts)


def public_arguments(args: PretrainArguments) -> dict[str, Any]:
    """The run's options for files that get published (metrics.json, the card): local paths are reduced to their
    base names, so that a pushed folder does not reveal the machine's directory layout."""
    values = asdict(args)
    for name in _PATH_OPTIONS:
        if values[name] and _is_local(values[name]):
            values[name] = _public_name(values[name])
    return values


def _public_metrics(metrics: dict[str, Any], args: PretrainArguments) -> dict[str, Any]:
    """`metrics` with the dataset's local folder taken out of the bad-row descriptions."""
    if not os.path.exists(args.dataset):
        return metrics
    root = os.path.dirname(os.path.abspath(args.dataset)) + os.sep
    examples = [example.replace(root, "") for example in metrics.get("bad_row_examples", [])]
    return {**metrics, "bad_row_examples": examples}


def _base_model(text_tower: str | None) -> str | None:
    """The Hub id of the pretrained text tower, for the card's `base_model` (None for a local folder)."""
    if text_tower == "minilm":
        return "sentence-transformers/all-MiniLM-L6-v2"
    return text_tower if text_tower and not os.path.exists(text_tower) else None


def format_retrieval_table(metrics: dict[str, Any]) -> str:
    """Markdown tables of the test figures in `metrics`: Recall@K both ways, then zero-shot, ITM, VQA and captioning."""
    lines = ["| direction | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    for direction in ("text_to_image", "image_to_text"):
        cells = [f"{100 * metrics[f'test_{direction}_R@{k}']:.1f}" for k in (1, 5, 10)]
        lines.append(f"| {direction.replace('_', ' ')} | " + " | ".join(cells) + " |")
    chance = metrics["test_chance_R@1"]
    lines.append(f"\nChance level: R@1 = {100 * chance:.1f}%, R@10 = {100 * min(1.0, 10 * chance):.1f}%.")
    others = [
        (label, metrics[f"test_{key}"])
        for key, label in (
            ("zero_shot_top1", "zero-shot top-1 (%)"),
            ("zero_shot_top5", "zero-shot top-5 (%)"),
            ("itm_accuracy", "ITM accuracy, random negatives (%)"),
            ("itm_hard_accuracy", "ITM accuracy, hard negatives (%)"),
            ("vqa_accuracy", "VQA accuracy (%)"),
            ("captioning_bleu4", "captioning BLEU-4 (%)"),
            ("captioning_cider", "captioning CIDEr (x100)"),
        )
        if f"test_{key}" in metrics
    ]
    if others:
        lines += ["", "| metric | value |", "|---|---|"] + [
            f"| {label} | {100 * value:.1f} |" for label, value in others
        ]
    return "\n".join(lines)


__all__ = ["format_retrieval_table", "public_arguments", "write_run_report"]
