"""Evaluation of image-text models: embedding a dataset in batches and retrieval Recall@K in both directions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

from xmodal import XModalModel, XModalProcessor

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def retrieval_metrics(logits_per_text: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K of text->image and image->text retrieval, and the mean rank of the true match, for N paired items
    (text i belongs to image i).

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
    for name, scores in (("text_to_image", logits_per_text), ("image_to_text", logits_per_text.t())):
        true_scores = scores.diagonal().unsqueeze(1)
        # rank = number of candidates scoring at least as high as the true match: ties count against the model,
        # so a collapsed model (all scores equal) ranks last, not first
        ranks = (scores >= true_scores).sum(dim=1)
        for k in ks:
            metrics[f"{name}_R@{k}"] = (ranks <= k).float().mean().item()
        metrics[f"{name}_mean_rank"] = ranks.float().mean().item()
    return metrics


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
    """L2-normalised image and text embeddings of every row, each `(len(dataset), projection_dim)`."""
    model.eval()
    device = next(model.parameters()).device
    image_embeds, text_embeds = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="embedding", disable=not show_progress):
        rows = dataset[start : start + batch_size]
        inputs = processor(
            images=rows[image_column],
            text=rows[text_column],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        image_embeds.append(
            F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1)
        )
        text_inputs = {key: value for key, value in inputs.items() if key != "pixel_values"}
        text_embeds.append(F.normalize(model.get_text_features(**text_inputs).pooler_output, dim=-1))
    return torch.cat(image_embeds).float().cpu(), torch.cat(text_embeds).float().cpu()


def evaluate_retrieval(
    model: XModalModel,
    processor: XModalProcessor,
    dataset: Dataset,
    ks: Sequence[int] = DEFAULT_KS,
    **embed_kwargs: object,
) -> dict[str, float]:
    """Text->image and image->text Recall@K (and mean rank) of a paired image-text dataset."""
    if len(dataset) == 0:
        raise ValueError("evaluate_retrieval got an empty dataset.")
    image_embeds, text_embeds = embed_dataset(model, processor, dataset, **embed_kwargs)
    return retrieval_metrics(text_embeds @ image_embeds.t(), ks)


__all__ = ["DEFAULT_KS", "embed_dataset", "evaluate_retrieval", "retrieval_metrics"]
