"""Model cards: rendered from the template in `model_cards/` with huggingface_hub's `ModelCard`, with YAML metadata
(`library_name`, `pipeline_tag`, tags, datasets, metrics, `base_model` and a `model-index` of the evaluation
results), the card's pictures, and a how-to-use snippet that loads the model with `trust_remote_code`."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from xmodal import XModalConfig
from xmodal.training.publishing.plots import plot_loss_curve

TEMPLATE = "xmodal_model_card.md"
LOSS_CURVE_FILE = "loss_curve.png"
RETRIEVAL_EXAMPLE_FILE = "retrieval_example.png"
# the namespace of the repo id a card names until `push_to_hub` puts the real one in
PLACEHOLDER_NAMESPACE = "your-name"
CARD_TAGS = ["xmodal", "image-text", "contrastive-learning", "multimodal", "custom_code"]


@dataclass(frozen=True)
class CardMetric:
    """How a metric appears in the card's `model-index` and results table."""

    task_type: str
    task_name: str
    metric_type: str
    name: str


_RETRIEVAL = ("image-text-retrieval", "Image-text retrieval", "recall")
_CAPTIONING = ("image-to-text", "Image captioning")
# metric key (after its split prefix) -> how the card shows it; values are fractions, shown x100
CARD_METRICS: dict[str, CardMetric] = {
    **{f"text_to_image_R@{k}": CardMetric(*_RETRIEVAL, f"Text-to-image Recall@{k}") for k in (1, 5, 10)},
    **{f"image_to_text_R@{k}": CardMetric(*_RETRIEVAL, f"Image-to-text Recall@{k}") for k in (1, 5, 10)},
    "zero_shot_top1": CardMetric(
        "zero-shot-image-classification", "Zero-shot image classification", "accuracy", "Zero-shot top-1 accuracy"
    ),
    "zero_shot_top5": CardMetric(
        "zero-shot-image-classification", "Zero-shot image classification", "accuracy", "Zero-shot top-5 accuracy"
    ),
    "vqa_accuracy": CardMetric("visual-question-answering", "Visual question answering", "accuracy", "VQA accuracy"),
    "captioning_bleu4": CardMetric(*_CAPTIONING, "bleu", "BLEU-4"),
    "captioning_cider": CardMetric(*_CAPTIONING, "cider", "CIDEr"),
}
# metrics-dict key prefix -> dataset split
METRIC_SPLITS: dict[str, str] = {"test_": "test", "validation_": "validation"}
# saved architecture -> the Hub pipeline tag of what it does
PIPELINE_TAGS: dict[str, str] = {
    "XModalModel": "zero-shot-image-classification",
    "XModalForPreTraining": "zero-shot-image-classification",
    "XModalForImageTextRetrieval": "zero-shot-image-classification",
    "XModalForImageClassification": "image-classification",
    "XModalForConditionalGeneration": "image-to-text",
    "XModalForVisualQuestionAnswering": "visual-question-answering",
    "XModalForMaskedLM": "fill-mask",
}
_OBJECTIVE_NAMES = {
    "itm": "image-text matching",
    "mlm": "masked language modelling",
    "mim": "masked image modelling",
    "captioning": "captioning",
    "vqa": "visual question answering",
}
# the repo id in the template's how-to-use snippet
_USAGE_REPO_ID = re.compile(r'from_pretrained\("([^"]+)", trust_remote_code=True\)')


def _tower_summary(config: Any) -> str:
    parts = [f"`{config.model_type}`", f"hidden {config.hidden_size}", f"{config.num_hidden_layers} layers"]
    parts.append(f"{config.num_attention_heads} heads")
    if hasattr(config, "image_size"):
        parts.append(f"{config.image_size} px images, patch {config.patch_size}")
    if hasattr(config, "vocab_size"):
        parts.append(f"vocabulary {config.vocab_size}")
    return ", ".join(parts)


def _objectives_summary(config: XModalConfig, objectives: list[str]) -> str:
    """A phrase naming the pretraining objectives of the run, e.g. "a contrastive loss (...) and captioning"."""
    if config.contrastive_loss_type == "siglip":
        contrastive = "a contrastive loss (SigLIP's pairwise sigmoid loss)"
    else:
        contrastive = "a contrastive loss (symmetric InfoNCE / NT-Xent with a learnable temperature)"
    parts = [contrastive if name == "contrastive" else _OBJECTIVE_NAMES[name] for name in objectives]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def card_eval_results(metrics: dict[str, Any], dataset_name: str, dataset_type: str = "synthetic") -> list[EvalResult]:
    """The `model-index` entries of the known metrics in `metrics` (keys `test_<name>` or `validation_<name>` with
    `<name>` in `CARD_METRICS`; other keys are ignored), values x100 rounded to 2 decimals, in `CARD_METRICS`
    order."""
    results = []
    for prefix, split in METRIC_SPLITS.items():
        for key, metric in CARD_METRICS.items():
            value = metrics.get(prefix + key)
            if isinstance(value, (int, float)):
                results.append(
                    EvalResult(
                        task_type=metric.task_type,
                        task_name=metric.task_name,
                        dataset_type=dataset_type,
                        dataset_name=dataset_name,
                        dataset_split=split,
                        metric_type=metric.metric_type,
                        metric_name=metric.name,
                        metric_value=round(100 * float(value), 2),
                    )
                )
    return results


def loss_curves(metrics: dict[str, Any]) -> dict[str, list[float]]:
    """The curves of a pretraining run's metrics for `plot_loss_curve`: the total loss, and each objective's loss
    when there are several objectives (empty when the metrics hold no losses)."""
    if not metrics.get("losses"):
        return {}
    # an objective's curve holds None at the steps that skipped it (`--auxiliary_every`)
    objective_losses = {
        name: [math.nan if value is None else value for value in values]
        for name, values in metrics.get("objective_losses", {}).items()
        if values
    }
    if len(objective_losses) < 2:
        return {"loss": list(metrics["losses"])}
    return {"total": list(metrics["losses"]), **objective_losses}


def render_model_card(
    config: XModalConfig,
    metrics: dict[str, Any],
    repo_id: str = f"{PLACEHOLDER_NAMESPACE}/xmodal-model",
    dataset_name: str = "xmodal procedural shapes",
    dataset_type: str = "synthetic",
    training_arguments: dict[str, Any] | None = None,
    num_parameters: int | None = None,
    *,
    datasets: list[str] | None = None,
    base_model: str | list[str] | None = None,
    pipeline_tag: str | None = None,
    tags: list[str] | None = None,
    license: str = "apache-2.0",
    loss_curve_image: str | None = None,
    retrieval_example_image: str | None = None,
) -> ModelCard:
    """Renders the model card of a trained model from its config, the run's metrics and arguments.

    Args:
        config: the model's config; `config.architectures` (set when the model is saved) picks the pipeline tag.
        metrics: the run's metrics; the keys of `card_eval_results` become the `model-index`, `losses`,
            `objectives`, `train_steps`... the training summary. Unknown keys are ignored.
        repo_id: the Hub repo named in the how-to-use snippet (`push_to_hub` replaces it with the real one).
        dataset_name: the evaluation data, as named in the card and its `model-index`.
        dataset_type: its `model-index` type (a Hub dataset id, or a short name for local data).
        training_arguments: the run's options, listed under "Training".
        num_parameters: the model's parameter count.
        datasets: Hub dataset ids the model was trained on (`datasets:` metadata).
        base_model: the Hub model(s) the model was initialised from (`base_model:` metadata).
        pipeline_tag: overrides the tag derived from the architecture (`PIPELINE_TAGS`).
        tags: extra tags after `CARD_TAGS`.
        license: the license identifier.
        loss_curve_image, retrieval_example_image: file names (relative to the card) of the pictures to show.
    """
    model_name = repo_id.split("/")[-1]
    eval_results = card_eval_results(metrics, dataset_name, dataset_type)
    architecture = (getattr(config, "architectures", None) or ["XModalModel"])[0]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag or PIPELINE_TAGS.get(architecture, "zero-shot-image-classification"),
        license=license,
        tags=CARD_TAGS + [tag for tag in tags or [] if tag not in CARD_TAGS],
        datasets=datasets,
        base_model=base_model,
        metrics=sorted({result.metric_type for result in eval_results}) or None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    if training_arguments:
        training_summary = "\n".join(f"- `{key}`: {value}" for key, value in training_arguments.items())
        if "train_seconds" in metrics:
            training_summary += (
                f"\n\nTrained {metrics['train_steps']} steps ({metrics['train_pairs']} image-text pairs) in "
                f"{metrics['train_seconds']} s; loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}."
            )
    else:
        training_summary = "Not recorded."
    if eval_results:
        rows = [
            f"| {result.task_name} | {result.metric_name} | {result.dataset_split} | {result.metric_value:.1f} |"
            for result in eval_results
        ]
        results_table = "| task | metric | split | value (x100) |\n|---|---|---|---|\n" + "\n".join(rows)
    else:
        results_table = "No evaluation was run."
    cross = config.cross_config
    template = resources.files("xmodal.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        repo_id=repo_id,
        projection_dim=config.projection_dim,
        objectives_summary=_objectives_summary(config, list(metrics.get("objectives", ["contrastive"]))),
        fusion_layers=cross.num_hidden_layers,
        fusion_direction=cross.direction,
        vision_summary=_tower_summary(config.vision_config),
        text_summary=_tower_summary(config.text_config),
        fusion_summary=_tower_summary(cross) + f", direction `{cross.direction}`",
        num_parameters=f"{num_parameters:,}" if num_parameters else "see model.num_parameters()",
        training_summary=training_summary,
        results_table=results_table,
        loss_curve_image=loss_curve_image,
        retrieval_example_image=retrieval_example_image,
        limitations=(
            f"Trained on {dataset_name}, a small image-text set; the embeddings describe that domain only and are "
            "not a general-purpose vision-language model."
        ),
    )


def write_model_card(
    output_dir: str | os.PathLike,
    config: XModalConfig,
    metrics: dict[str, Any],
    *,
    plot_losses: bool = True,
    **kwargs: Any,
) -> str:
    """Renders the card and writes it to `output_dir/README.md`; returns the path.

    With `plot_losses`, the run's loss curves (`metrics["losses"]`, and `metrics["objective_losses"]` with several
    objectives) are drawn into `output_dir/loss_curve.png` first. The card shows `loss_curve.png` and
    `retrieval_example.png` when they are in `output_dir`. `repo_id` defaults to `your-name/<folder name>`; the other
    keyword arguments are those of `render_model_card`.
    """
    path = os.path.join(output_dir, "README.md")
    kwargs.setdefault("repo_id", f"{PLACEHOLDER_NAMESPACE}/{os.path.basename(os.path.abspath(output_dir))}")
    curves = loss_curves(metrics) if plot_losses else {}
    if curves:
        title = f"{kwargs['repo_id'].split('/')[-1]}: training loss"
        plot_loss_curve(curves, os.path.join(output_dir, LOSS_CURVE_FILE), title=title)
    for key, file_name in (("loss_curve_image", LOSS_CURVE_FILE), ("retrieval_example_image", RETRIEVAL_EXAMPLE_FILE)):
        if os.path.isfile(os.path.join(output_dir, file_name)):
            kwargs.setdefault(key, file_name)
    render_model_card(config, metrics, **kwargs).save(path)
    return path


def retarget_model_card(card_text: str, repo_id: str) -> str:
    """The text of a card rendered by `render_model_card` with its repo id replaced by `repo_id`: in the how-to-use
    snippets, the title and the `model-index` name. A card without the template's snippet is returned unchanged."""
    match = _USAGE_REPO_ID.search(card_text)
    if match is None or match.group(1) == repo_id:
        return card_text
    old_name, new_name = match.group(1).split("/")[-1], repo_id.split("/")[-1]
    card = ModelCard(card_text.replace(f'"{match.group(1)}"', f'"{repo_id}"'))
    if card.data.model_name == old_name:
        card.data.model_name = new_name
    card.text = re.sub(rf"^# {re.escape(old_name)}$", f"# {new_name}", card.text, count=1, flags=re.MULTILINE)
    return str(card)


__all__ = [
    "CARD_METRICS",
    "CARD_TAGS",
    "LOSS_CURVE_FILE",
    "METRIC_SPLITS",
    "PIPELINE_TAGS",
    "PLACEHOLDER_NAMESPACE",
    "RETRIEVAL_EXAMPLE_FILE",
    "CardMetric",
    "card_eval_results",
    "loss_curves",
    "render_model_card",
    "retarget_model_card",
    "write_model_card",
]
