"""Model cards: rendered from the template in `model_cards/` with huggingface_hub's `ModelCard`, with YAML metadata
(`library_name`, `pipeline_tag`, tags, datasets, metrics and a `model-index` of the evaluation results)."""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from xmodal import XModalConfig

TEMPLATE = "xmodal_model_card.md"
_RETRIEVAL_KEYS = {
    "test_text_to_image_R@1": "Text-to-image Recall@1",
    "test_text_to_image_R@5": "Text-to-image Recall@5",
    "test_text_to_image_R@10": "Text-to-image Recall@10",
    "test_image_to_text_R@1": "Image-to-text Recall@1",
    "test_image_to_text_R@5": "Image-to-text Recall@5",
    "test_image_to_text_R@10": "Image-to-text Recall@10",
}


def _tower_summary(config: Any) -> str:
    parts = [f"`{config.model_type}`", f"hidden {config.hidden_size}", f"{config.num_hidden_layers} layers"]
    parts.append(f"{config.num_attention_heads} heads")
    if hasattr(config, "image_size"):
        parts.append(f"{config.image_size} px images, patch {config.patch_size}")
    if hasattr(config, "vocab_size"):
        parts.append(f"vocabulary {config.vocab_size}")
    return ", ".join(parts)


_OBJECTIVE_NAMES = {
    "itm": "image-text matching",
    "mlm": "masked language modelling",
    "mim": "masked image modelling",
    "captioning": "captioning",
    "vqa": "visual question answering",
}


def _objectives_summary(config: XModalConfig, objectives: list[str]) -> str:
    """A phrase naming the pretraining objectives of the run, e.g. "a contrastive loss (...) and captioning"."""
    if config.contrastive_loss_type == "siglip":
        contrastive = "a contrastive loss (SigLIP's pairwise sigmoid loss)"
    else:
        contrastive = "a contrastive loss (symmetric InfoNCE / NT-Xent with a learnable temperature)"
    parts = [contrastive if name == "contrastive" else _OBJECTIVE_NAMES[name] for name in objectives]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def render_model_card(
    config: XModalConfig,
    metrics: dict[str, Any],
    repo_id: str = "your-name/xmodal-model",
    dataset_name: str = "xmodal procedural shapes",
    training_arguments: dict[str, Any] | None = None,
    num_parameters: int | None = None,
) -> ModelCard:
    """Renders the model card of a trained model from its config, the run's metrics and arguments."""
    eval_results = [
        EvalResult(
            task_type="image-text-retrieval",
            task_name="Image-text retrieval",
            dataset_type="synthetic",
            dataset_name=dataset_name,
            dataset_split="test",
            metric_type="recall",
            metric_name=name,
            metric_value=round(100 * metrics[key], 2),
        )
        for key, name in _RETRIEVAL_KEYS.items()
        if key in metrics
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license="apache-2.0",
        tags=["xmodal", "image-text", "contrastive-learning", "custom_code"],
        metrics=["recall"],
        model_name=repo_id.split("/")[-1],
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
        rows = [f"| {result.metric_name} | {result.metric_value:.1f} |" for result in eval_results]
        results_table = "| metric (test split, %) | value |\n|---|---|\n" + "\n".join(rows)
    else:
        results_table = "No evaluation was run."
    cross = config.cross_config
    template = resources.files("xmodal.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=repo_id.split("/")[-1],
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
        limitations=(
            f"Trained on {dataset_name}, a small image-text set; the embeddings describe that domain only and are "
            "not a general-purpose vision-language model."
        ),
    )


def write_model_card(
    output_dir: str | os.PathLike,
    config: XModalConfig,
    metrics: dict[str, Any],
    **kwargs: Any,
) -> str:
    """Renders the card and writes it to `output_dir/README.md`; returns the path."""
    path = os.path.join(output_dir, "README.md")
    render_model_card(config, metrics, **kwargs).save(path)
    return path


__all__ = ["render_model_card", "write_model_card"]
