"""Learnable prompts for zero-shot classification: CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022).

Instead of hand-written prompts ("a photo of a {}."), M context vectors are learned in the text tower's word-embedding
space from a few labelled images per class, with both towers frozen. Each class prompt is

    [CLS] v_1 ... v_M <class name tokens> [SEP]

run through the text tower with `inputs_embeds`; the context `v_1 ... v_M` is shared by all classes (unified context)
or learned per class (class-specific context, CSC). Training minimises the cross-entropy of the model's scaled
image-text similarities over the classes, with the image embeddings computed once.

```python
>>> learner = train_prompts(model, processor, images, labels, ["circle", "square", "star"], context_init="a photo of a")
>>> learner.save_prompts("outputs/xmodal-tiny")  # outputs/xmodal-tiny/xmodal_prompts.safetensors, a few KB
>>> learner = load_prompts("outputs/xmodal-tiny", model)  # checks that `model` has the text tower it was learned on
>>> ZeroShotClassifier(model, processor, learner.class_names, prompts=learner).classify(["shape.png"])
```
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from numbers import Integral
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from xmodal import XModalModel, XModalProcessor
from xmodal.training.inference.embeddings import ImageInput, embed_images
from xmodal.training.inference.index import text_fingerprint
from xmodal.training.inference.zero_shot import check_labels

logger = logging.getLogger(__name__)

PROMPTS_FILE = "xmodal_prompts.safetensors"
"""File name of learned prompts saved into a folder (e.g. next to the model's `model.safetensors`)."""

DEFAULT_NUM_CONTEXT = 8
"""Context vectors learned when neither `num_context` nor `context_init` is given."""

_FORMAT = "xmodal-prompts"
_VERSION = "1"


def _prompt_tokens(
    processor: XModalProcessor, class_names: list[str], num_context: int, max_positions: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The token ids `(num_classes, length)` of `[CLS] X ... X <name> [SEP]` with `num_context` placeholders X (their
    embeddings are replaced by the context vectors), the attention mask `(num_classes, length)`, and the position of the
    first placeholder (after the tokenizer's leading special tokens). Prompts must fit `max_positions` (None: any
    length)."""
    tokenizer = processor.tokenizer
    placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, starts = [], set()
    for name in class_names:
        ids = tokenizer(name, add_special_tokens=True)["input_ids"]
        special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
        start = next((index for index, flag in enumerate(special) if not flag), len(ids))
        starts.add(start)
        row = ids[:start] + [placeholder] * num_context + ids[start:]
        if max_positions is not None and len(row) > max_positions:
            raise ValueError(
                f"The prompt for class {name!r} is {len(row)} tokens ({num_context} context vectors, {len(ids)} tokens "
                f"for the name and special tokens), over the text tower's {max_positions} positions; use fewer "
                "context vectors or a shorter class name."
            )
        rows.append(row)
    if len(starts) != 1:
        raise ValueError(f"The tokenizer puts a varying number of special tokens before the text: {sorted(starts)}.")
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [placeholder] * (length - len(row)) for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows], dtype=torch.long)
    return input_ids, attention_mask, starts.pop()


class PromptLearner(nn.Module):
    """Learnable context vectors (CoOp) that turn class names into class embeddings through a frozen text tower.

    The only parameter is `context`: `(num_context, hidden_size)` when shared by the classes, `(num_classes,
    num_context, hidden_size)` when class-specific. The prompt tokens are buffers; the model is not part of the module
    (its state dict is the context and the tokens only): pass it to `forward`. Build one with `from_class_names`,
    train it with `train_prompts`, save it with `save_prompts` and reload it with `load_prompts`.

    Args:
        class_names: the classes, in logit order.
        input_ids (`torch.LongTensor` of shape `(num_classes, length)`): `[CLS] X ... X <name> [SEP]` and padding.
        attention_mask (`torch.LongTensor` of shape `(num_classes, length)`).
        context_start: the position of the first context vector in the prompts.
        context (`torch.FloatTensor` of shape `(num_context, hidden_size)` or `(num_classes, num_context,
            hidden_size)`): the initial context.
        fingerprint: `text_fingerprint` of the model the prompts are for.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        context_start: int,
        context: torch.Tensor,
        fingerprint: str,
    ) -> None:
        super().__init__()
        self.class_names = check_labels(class_names)
        num_classes = len(self.class_names)
        if context.ndim not in (2, 3) or (context.ndim == 3 and context.shape[0] != num_classes):
            raise ValueError(
                f"context must have shape (num_context, hidden_size) or ({num_classes}, num_context, hidden_size), "
                f"got {tuple(context.shape)}."
            )
        num_context = context.shape[-2]
        if input_ids.shape != attention_mask.shape or input_ids.shape[0] != num_classes:
            raise ValueError(
                f"input_ids and attention_mask must both have shape ({num_classes}, length), got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}."
            )
        if not 0 <= context_start <= input_ids.shape[1] - num_context:
            raise ValueError(f"context_start {context_start} leaves no room for {num_context} context vectors.")
        self.context = nn.Parameter(context.detach().clone().float())
        self.register_buffer("input_ids", input_ids.long(), persistent=True)
        self.register_buffer("attention_mask", attention_mask.long(), persistent=True)
        self.context_start = context_start
        self.fingerprint = fingerprint

    @property
    def num_context(self) -> int:
        """Context vectors per prompt (M)."""
        return self.context.shape[-2]

    @property
    def class_specific(self) -> bool:
        """Whether each class has its own context (CSC) rather than one shared by all."""
        return self.context.ndim == 3

    @classmethod
    def from_class_names(
        cls,
        model: XModalModel,
        processor: XModalProcessor,
        class_names: Sequence[str],
        num_context: int | None = None,
        context_init: str | None = None,
        class_specific: bool = False,
        seed: int = 0,
    ) -> PromptLearner:
        """A new learner for `class_names` on `model`'s text tower.

        Args:
            num_context: context vectors M (default: the token count of `context_init`, else `DEFAULT_NUM_CONTEXT`).
            context_init: a phrase (e.g. "a photo of a") whose word embeddings initialise the context (every class's
                when class-specific); without it, the context is drawn from N(0, 0.02^2) with `seed`.
            class_specific: one context per class instead of one shared by all classes.

        Raises:
            ValueError: bad class names, `num_context` < 1 or not the token count of `context_init`, or prompts
                longer than the text tower's positions.
        """
        class_names = check_labels(class_names)
        word_embeddings = model.get_input_embeddings()
        if context_init is not None:
            init_ids = processor.tokenizer(context_init, add_special_tokens=False)["input_ids"]
            if not init_ids:
                raise ValueError(f"context_init {context_init!r} has no tokens.")
            if num_context is not None and num_context != len(init_ids):
                raise ValueError(
                    f"num_context={num_context} differs from the {len(init_ids)} tokens of context_init "
                    f"{context_init!r}; leave num_context out to use the phrase's length."
                )
            num_context = len(init_ids)
            with torch.no_grad():
                context = word_embeddings(torch.tensor(init_ids, device=word_embeddings.weight.device)).float().cpu()
            if class_specific:
                context = context.expand(len(class_names), -1, -1)
        else:
            num_context = DEFAULT_NUM_CONTEXT if num_context is None else num_context
            if isinstance(num_context, bool) or not isinstance(num_context, int) or num_context < 1:
                raise ValueError(f"num_context must be a positive integer, got {num_context!r}.")
            shape = (num_context, word_embeddings.weight.shape[1])
            shape = (len(class_names), *shape) if class_specific else shape
            context = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
        max_positions = getattr(model.config.text_config, "max_position_embeddings", None)
        input_ids, attention_mask, start = _prompt_tokens(processor, class_names, num_context, max_positions)
        return cls(class_names, input_ids, attention_mask, start, context, text_fingerprint(model))

    def with_class_names(self, processor: XModalProcessor, class_names: Sequence[str]) -> PromptLearner:
        """The learned context applied to other class names: any names with a shared context (CoOp's transfer to new
        classes), a subset or reordering of `self.class_names` with a class-specific one.

        Raises:
            ValueError: a class-specific context and a name it was not learned for.
        """
        class_names = check_labels(class_names)
        context = self.context.detach()
        if self.class_specific:
            unknown = [name for name in class_names if name not in self.class_names]
            if unknown:
                raise ValueError(
                    f"These prompts have a class-specific context, learned for {self.class_names} only; no context "
                    f"for {unknown}. Learn a shared context (class_specific=False) to transfer to new class names."
                )
            context = context[[self.class_names.index(name) for name in class_names]]
        input_ids, attention_mask, start = _prompt_tokens(processor, class_names, self.num_context, None)
        return type(self)(class_names, input_ids, attention_mask, start, context, self.fingerprint)

    def check_model(self, model: XModalModel) -> None:
        """Raises ValueError unless `model` has the text tower these prompts were learned on (same
        `text_fingerprint`)."""
        actual = text_fingerprint(model)
        if actual != self.fingerprint:
            raise ValueError(
                f"These prompts were learned on another text tower (fingerprint {self.fingerprint[:12]}...) than the "
                f"model's (fingerprint {actual[:12]}...): learned prompts only fit the exact model (config and "
                "text-tower weights) they were trained with. Learn them again for this model with train_prompts."
            )

    def prompt_embeddings(self, model: XModalModel) -> torch.Tensor:
        """The prompts' word embeddings `(num_classes, length, hidden_size)`: the model's embeddings of the tokens
        with the context vectors in place of the placeholders (differentiable in `context`)."""
        word_embeddings = model.get_input_embeddings()
        weight = word_embeddings.weight
        embeds = word_embeddings(self.input_ids.to(weight.device))
        context = self.context.to(weight.device, weight.dtype)
        if not self.class_specific:
            context = context.expand(len(self.class_names), -1, -1)
        start, end = self.context_start, self.context_start + self.num_context
        return torch.cat([embeds[:, :start], context, embeds[:, end:]], dim=1)

    def forward(self, model: XModalModel) -> torch.Tensor:
        """L2-normalised class embeddings `(num_classes, projection_dim)` from `model`'s text tower (on the model's
        device, differentiable in `context`; wrap in `torch.no_grad()` for inference). Does not change the model's
        train/eval mode: use eval mode (no dropout), as `train_prompts` does."""
        weight = model.get_input_embeddings().weight
        features = model.get_text_features(
            inputs_embeds=self.prompt_embeddings(model), attention_mask=self.attention_mask.to(weight.device)
        ).pooler_output
        return F.normalize(features, dim=-1)

    def save_prompts(self, path: str | os.PathLike) -> Path:
        """Saves the context, the prompt tokens and the metadata (class names, num_context, class_specific, the model's
        text fingerprint) as safetensors: to `path` if it ends in `.safetensors`, else to `path/PROMPTS_FILE` (e.g.
        next to the model). Returns the file written."""
        file = _prompts_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": _FORMAT,
            "version": _VERSION,
            "class_names": json.dumps(self.class_names),
            "num_context": str(self.num_context),
            "class_specific": json.dumps(self.class_specific),
            "context_start": str(self.context_start),
            "text_fingerprint": self.fingerprint,
        }
        tensors = {
            "context": self.context.detach().float().cpu().contiguous(),
            "input_ids": self.input_ids.cpu().contiguous(),
            "attention_mask": self.attention_mask.cpu().contiguous(),
        }
        save_file(tensors, str(file), metadata=metadata)
        return file

    def extra_repr(self) -> str:
        kind = "class-specific" if self.class_specific else "shared"
        return f"num_classes={len(self.class_names)}, num_context={self.num_context}, {kind}"


def _prompts_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / PROMPTS_FILE


def load_prompts(path: str | os.PathLike, model: XModalModel) -> PromptLearner:
    """Learned prompts saved by `PromptLearner.save_prompts` (a `.safetensors` file, or a folder holding
    `PROMPTS_FILE`), checked against `model`, placed on the model's device.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an xmodal prompts file, or learned on another text tower than `model`'s.
    """
    file = _prompts_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"No learned prompts at {os.fspath(file)!r} (save them with learner.save_prompts).")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as err:
        raise ValueError(f"{os.fspath(file)!r} is not a safetensors file: {err}") from err
    if metadata.get("format") != _FORMAT or metadata.get("version") != _VERSION:
        raise ValueError(
            f"{os.fspath(file)!r} is not an xmodal prompts file of version {_VERSION} (metadata format "
            f"{metadata.get('format')!r}, version {metadata.get('version')!r})."
        )
    learner = PromptLearner(
        json.loads(metadata["class_names"]),
        tensors["input_ids"],
        tensors["attention_mask"],
        int(metadata["context_start"]),
        tensors["context"],
        metadata["text_fingerprint"],
    )
    learner.check_model(model)
    return learner.to(model.get_input_embeddings().weight.device).eval()


def _class_indices(labels: Sequence[int | str], class_names: list[str]) -> torch.Tensor:
    """`labels` (class indices, or class names) as a LongTensor of class indices."""
    indices = []
    for label in labels:
        if isinstance(label, str):
            if label not in class_names:
                raise ValueError(f"Label {label!r} is not one of the class names {class_names}.")
            indices.append(class_names.index(label))
        elif isinstance(label, Integral) and not isinstance(label, bool) and 0 <= label < len(class_names):
            indices.append(int(label))
        else:
            raise ValueError(f"Labels must be class indices in [0, {len(class_names)}) or class names, got {label!r}.")
    return torch.tensor(indices, dtype=torch.long)


def _batches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatch indices: a fresh shuffle of the examples every epoch."""
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]


def train_prompts(
    model: XModalModel,
    processor: XModalProcessor,
    images: Sequence[ImageInput] | None,
    labels: Sequence[int | str],
    class_names: Sequence[str],
    *,
    image_embeds: torch.Tensor | None = None,
    num_context: int | None = None,
    context_init: str | None = None,
    class_specific: bool = False,
    steps: int = 200,
    learning_rate: float = 2e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> PromptLearner:
    """Learns CoOp prompts from a few labelled images per class, with the model frozen.

    Each step embeds every class prompt through the text tower and minimises the cross-entropy of
    `model.logits(image_embeds, class_embeddings)` (the model's clamped temperature, and bias for SigLIP models) over
    a minibatch of images; AdamW with a cosine decay updates the context only. The image embeddings are computed once
    (the image tower is frozen). The model's parameters are not updated and get no gradients (their `requires_grad`
    flags and train/eval mode are restored afterwards).

    Args:
        model: an xmodal model with both towers.
        processor: its processor (tokenizes the class names; embeds `images`).
        images: the training images (PIL images or paths), or None with `image_embeds`.
        labels: the class of each image, as an index into `class_names` or a class name.
        class_names: the classes.
        image_embeds (`torch.FloatTensor` of shape `(num_images, projection_dim)`, *optional*): image embeddings
            (e.g. from `embed_images`; L2-normalised here) instead of `images`, e.g. to reuse them across runs.
        num_context, context_init, class_specific: see `PromptLearner.from_class_names`.
        steps: optimizer steps.
        learning_rate: peak AdamW learning rate (cosine decay to 0 over `steps`).
        batch_size: images per step (all of them when fewer).
        weight_decay: AdamW weight decay of the context.
        seed: seeds the context initialisation and the minibatch order.

    Returns:
        The trained `PromptLearner`, in eval mode, on the model's device.
    """
    if (images is None) == (image_embeds is None):
        raise ValueError("Give exactly one of images and image_embeds (unit image embeddings from embed_images).")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    was_training = model.training
    learner = PromptLearner.from_class_names(
        model, processor, class_names, num_context, context_init, class_specific, seed
    )
    targets = _class_indices(labels, learner.class_names)
    if image_embeds is None:
        image_embeds = embed_images(model, processor, images)  # puts the model in eval mode
    if image_embeds.ndim != 2 or image_embeds.shape[0] != len(targets):
        raise ValueError(
            f"Got {len(targets)} labels for {image_embeds.shape[0] if image_embeds.ndim else 0} images "
            f"(image_embeds of shape {tuple(image_embeds.shape)}); give one label per image."
        )
    weight = model.get_input_embeddings().weight
    learner.to(weight.device)
    image_embeds = F.normalize(image_embeds.to(weight.device, weight.dtype), dim=-1)
    targets = targets.to(weight.device)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    batches = _batches(len(targets), batch_size, torch.Generator().manual_seed(seed))
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.requires_grad_(False)
    model.eval()
    learner.train()
    try:
        for step in range(steps):
            batch = next(batches).to(weight.device)
            logits = model.logits(image_embeds[batch], learner(model)).t()  # (batch, num_classes)
            loss = F.cross_entropy(logits.float(), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step == 0 or step == steps - 1:
                logger.info(f"prompt learning step {step + 1}/{steps}: loss {loss.item():.4f}")
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
        model.train(was_training)
    return learner.eval()


__all__ = [
    "DEFAULT_NUM_CONTEXT",
    "PROMPTS_FILE",
    "PromptLearner",
    "load_prompts",
    "train_prompts",
]
