"""Zero-shot image classification with prompt ensembles (CLIP) or learned prompts (CoOp, see
`xmodal.training.transfer.prompt_learning`).

```python
>>> classifier = ZeroShotClassifier(model, processor, ["cat", "dog", "car"])  # embeds the labels once
>>> classifier.classify(["photo.jpg"], top_k=2)
[[('cat', 0.91), ('dog', 0.07)]]
```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from xmodal import XModalModel, XModalProcessor

if TYPE_CHECKING:
    from xmodal.training.transfer.prompt_learning import PromptLearner
from xmodal.training.inference.embeddings import ImageInput, _ranked, embed_images, embed_texts

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "an image of {}.",
    "a picture of {}.",
    "a photo of the {}.",
    "a close-up photo of {}.",
    "a drawing of {}.",
    "{}",
)
"""Prompt templates for generic images; `{}` is replaced by the label (CLIP's prompt ensembling)."""


def check_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """The prompt templates as a tuple (a single string is one template).

    Raises:
        ValueError: no template is given, or a template lacks the `{}` placeholder for the label.
    """
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates:
        raise ValueError("At least one prompt template is needed, e.g. 'a photo of {}.'.")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(
                f"Prompt template {template!r} has no '{{}}' placeholder for the label; e.g. 'a photo of {{}}.'."
            )
    return templates


def check_labels(labels: Sequence[str]) -> list[str]:
    """The class labels as a list.

    Raises:
        TypeError: `labels` is a single string.
        ValueError: no label, an empty or non-string label, or duplicates.
    """
    if isinstance(labels, str):
        raise TypeError(f"labels must be a sequence of strings, not the single string {labels!r}.")
    labels = list(labels)
    if not labels:
        raise ValueError("Zero-shot classification needs at least one label.")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"Labels must be non-empty strings, got {label!r}.")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"Labels must be distinct, got duplicates {duplicates}.")
    return labels


def ensemble_text_embeddings(
    model: XModalModel,
    processor: XModalProcessor,
    labels: Sequence[str],
    templates: str | Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
    max_length: int | None = None,
) -> torch.Tensor:
    """One embedding per label from a prompt ensemble (CLIP): each template is filled with the label, the prompts
    are embedded and L2-normalised, averaged over the templates and renormalised.

    Returns:
        `torch.FloatTensor` of shape `(len(labels), projection_dim)`, unit rows.
    """
    labels = check_labels(labels)
    templates = check_templates(templates)
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    embeddings = embed_texts(model, processor, prompts, batch_size=batch_size, max_length=max_length)
    embeddings = embeddings.view(len(labels), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1)


class ZeroShotClassifier:
    """Zero-shot image classification over a fixed set of labels: the labels are embedded once (with a prompt
    ensemble, or with learned prompts), then every batch of images costs only the image tower.

    Probabilities are the softmax over the labels of the model's scaled similarities `model.logits` (the learned
    temperature, clamped as in training, and the SigLIP bias when the model has one).

    Args:
        model: an xmodal model with both towers (e.g. `XModalModel`).
        processor: its `XModalProcessor`.
        labels: the class names, distinct.
        templates: prompt templates with a `{}` placeholder (a string is a single template); default
            `DEFAULT_TEMPLATES`. Not with `prompts`.
        batch_size: images (and prompts) per forward pass.
        max_length: longest prompt in tokens (default: the tokenizer's `model_max_length`).
        prompts: learned prompts (a `PromptLearner` from `xmodal.training.transfer.prompt_learning.train_prompts` or
            `load_prompts`) that replace the template ensemble: each label is embedded as its learned prompt. Labels
            other than the learner's class names need a shared context (see `PromptLearner.with_class_names`).

    Attributes:
        labels: the labels, in probability order.
        templates: the templates of the ensemble (None with learned prompts).
        prompts: the learned prompts for `labels` (None with templates).
        label_embeddings (`torch.FloatTensor` of shape `(num_labels, projection_dim)`): unit label embeddings.

    Raises:
        ValueError: bad labels or templates, both `templates` and `prompts`, or prompts learned on another text tower.

    Example:

    ```python
    >>> classifier = ZeroShotClassifier(model, processor, ["circle", "square"], templates="a {} shape.")
    >>> classifier(images).shape  # probabilities
    torch.Size([len(images), 2])
    >>> learned = ZeroShotClassifier(model, processor, ["circle", "square"], prompts=load_prompts(folder, model))
    ```
    """

    def __init__(
        self,
        model: XModalModel,
        processor: XModalProcessor,
        labels: Sequence[str],
        templates: str | Sequence[str] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        prompts: PromptLearner | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.labels = check_labels(labels)
        self.batch_size = batch_size
        self.prompts = prompts
        if prompts is None:
            self.templates: tuple[str, ...] | None = check_templates(
                DEFAULT_TEMPLATES if templates is None else templates
            )
            self.label_embeddings = ensemble_text_embeddings(
                model, processor, self.labels, self.templates, batch_size=batch_size, max_length=max_length
            )
        else:
            if templates is not None:
                raise ValueError(
                    "Give either prompt templates or learned prompts (prompts=), not both: learned prompts replace "
                    "the template ensemble."
                )
            self.templates = None
            prompts.check_model(model)
            if prompts.class_names != self.labels:
                self.prompts = prompts = prompts.with_class_names(processor, self.labels)
            model.eval()
            with torch.no_grad():
                self.label_embeddings = prompts(model).float().cpu()

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Label probabilities `(len(images), num_labels)` (rows sum to 1) of PIL images or image paths."""
        if isinstance(images, (PIL.Image.Image, str, os.PathLike)):
            images = [images]
        image_embeds = embed_images(self.model, self.processor, images, batch_size=self.batch_size)
        scale = self.model.logit_scale
        logits_per_text = self.model.logits(
            image_embeds.to(scale.device, scale.dtype), self.label_embeddings.to(scale.device, scale.dtype)
        )
        return logits_per_text.t().float().softmax(dim=-1).cpu()

    def classify(self, images: Sequence[ImageInput], top_k: int | None = 5) -> list[list[tuple[str, float]]]:
        """For each image, its `top_k` most probable labels (all when None) as `(label, probability)` pairs."""
        return [_ranked(row, self.labels, top_k) for row in self(images)]


# ----------------------------------------------------------------------------------------------------------------
# Retrieval over a folder of images
# ----------------------------------------------------------------------------------------------------------------


__all__ = [
    "DEFAULT_TEMPLATES",
    "ZeroShotClassifier",
    "check_labels",
    "check_templates",
    "ensemble_text_embeddings",
]
