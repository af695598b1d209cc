"""Feature extraction and linear probes: how well a frozen model's features separate the classes of a labelled
dataset, measured by a logistic-regression classifier trained on them (CLIP's linear-probe evaluation).

```python
>>> from xmodal.training.transfer.linear_probe import extract_features, fit_linear_probe, linear_probe_evaluation
>>> linear_probe_evaluation(model, processor, train, test, "label", cache_dir="features/")
{'linear_probe_accuracy': 0.93, 'linear_probe_l2': 0.001, 'linear_probe_val_accuracy': 0.94,
 'linear_probe_train_rows': 5000}
>>> features = extract_features(model, processor, train, cache_dir="features/")  # (len(train), projection_dim)
>>> probe = fit_linear_probe(features[:4000], labels[:4000], features[4000:], labels[4000:])
>>> probe.l2, probe.val_accuracy, probe.predict(test_features)
```

- `extract_features` embeds one column of a `datasets.Dataset` in batches (with a progress bar) through the
  inference helpers `embed_images` / `embed_texts`, and caches the result in a safetensors file keyed by the model
  (`embedding_fingerprint`: weights, config, image processor; the tokenizer for text), the dataset's fingerprint and
  the options, so a second call with the same model and rows reads the file instead of running the model.
- `fit_linear_probe` fits a multinomial logistic regression in torch (full-batch L-BFGS with a strong Wolfe line
  search, or AdamW) for each L2 strength of a log-spaced grid, from the strongest to the weakest (each fit starts from
  the previous solution), refines around the best one, and keeps the strength with the best validation accuracy.
- `linear_probe_evaluation` does the whole protocol: features of a train and a test split, a validation split carved
  from the train rows with a seed to pick the L2 strength, a final fit on all the train rows (train + validation)
  with that strength, and its top-1 accuracy on the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from xmodal import XModalModel, XModalProcessor
from xmodal.training.data.sources import BAD_ROW_MARKER
from xmodal.training.inference.embeddings import _check_batch_size, _first_parameter, embed_images, embed_texts
from xmodal.training.inference.index import _CACHE_VERSION, _write_cache, embedding_fingerprint

logger = logging.getLogger(__name__)

Modality = Literal["image", "text"]
ProbeMethod = Literal["lbfgs", "adamw"]

MODALITIES: tuple[str, ...] = ("image", "text")
"""What `extract_features` can embed: the image column or the text column."""

PROBE_METHODS: tuple[str, ...] = ("lbfgs", "adamw")
"""Optimisers of `fit_logistic_regression`."""

DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0**exponent for exponent in range(-6, 3))
"""L2 strengths swept by `fit_linear_probe`: 1e-6, 1e-5, ..., 1e2 (the penalty is `l2 / 2 * ||W||^2` on top of the
mean cross-entropy)."""

FEATURES_CACHE_PREFIX = "xmodal-features-"
"""File name prefix of the feature caches written by `extract_features`."""


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def features_fingerprint(
    model: torch.nn.Module,
    processor: XModalProcessor,
    dataset: Dataset,
    *,
    modality: Modality = "image",
    pooled: bool = False,
    column: str = "image",
    max_length: int | None = None,
) -> str:
    """A hex digest of everything `extract_features` output depends on: the model and image processor
    (`embedding_fingerprint`), the tokenizer for text, the dataset (`dataset._fingerprint` and its length) and the
    options. Two calls share a cache file only when their fingerprints match."""
    parts: dict[str, Any] = {
        "version": _CACHE_VERSION,
        "model": embedding_fingerprint(model, processor),
        "dataset": dataset._fingerprint,
        "rows": len(dataset),
        "modality": modality,
        "pooled": pooled,
        "column": column,
    }
    if modality == "text":
        tokenizer = processor.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a `tokenizers` tokenizer: vocabulary and rules
        parts["tokenizer"] = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
        parts["max_length"] = max_length if max_length is not None else tokenizer.model_max_length
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()


def _read_features(path: Path, fingerprint: str, num_rows: int) -> torch.Tensor | None:
    """The cached features `(num_rows, dim)`, or None when the file is absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("version") != _CACHE_VERSION or metadata.get("fingerprint") != fingerprint:
                return None
            features = handle.get_tensor("embeddings")
    except (OSError, ValueError, SafetensorError) as err:  # a truncated or foreign file: a cache miss
        logger.warning(f"Ignoring the unreadable feature cache {path}: {err}")
        return None
    return features if features.ndim == 2 and len(features) == num_rows else None


@contextmanager
def _projection_inputs(model: torch.nn.Module, modality: Modality) -> Iterator[list[torch.Tensor]]:
    """Collects, while active, the input of the model's `visual_projection` (images) or `text_projection` (texts):
    the tower's pooled output `(batch_size, hidden_size)` of every forward pass, as float32 CPU tensors."""
    name = "visual_projection" if modality == "image" else "text_projection"
    projection = getattr(model, name, None)
    if not isinstance(projection, torch.nn.Module):
        raise TypeError(
            f"pooled=True reads the input of the model's {name}; {type(model).__name__} has none (use an xmodal "
            "model such as XModalModel, or pooled=False)."
        )
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach().float().cpu())

    handle = projection.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _embed_column(
    model: torch.nn.Module,
    processor: XModalProcessor,
    dataset: Dataset,
    modality: Modality,
    column: str,
    batch_size: int,
    max_length: int | None,
    show_progress: bool,
) -> torch.Tensor:
    """Unit embeddings `(len(dataset), projection_dim)` of one column, a batch of rows at a time."""
    embeddings = []
    batches = range(0, len(dataset), batch_size)
    for start in tqdm(batches, desc=f"{modality} features", disable=not show_progress):
        rows = dataset[start : start + batch_size]
        for offset, bad in enumerate(rows.get(BAD_ROW_MARKER) or ()):
            if bad is not None:
                raise ValueError(f"Row {start + offset} of the dataset could not be decoded ({bad}): drop it first.")
        values = rows[column]
        if modality == "image":
            embeddings.append(embed_images(model, processor, values, batch_size=batch_size))
        else:
            texts = [value if isinstance(value, str) else value[0] for value in values]  # a row's first caption
            embeddings.append(embed_texts(model, processor, texts, batch_size=batch_size, max_length=max_length))
    return torch.cat(embeddings)


def extract_features(
    model: XModalModel,
    processor: XModalProcessor,
    dataset: Dataset,
    *,
    modality: Modality = "image",
    pooled: bool = False,
    batch_size: int = 128,
    image_column: str = "image",
    text_column: str = "text",
    max_length: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Features of every row of `dataset`: its image (`modality="image"`) or its text (`"text"`; a row's first
    caption when the column holds lists), computed in batches of `batch_size` with a progress bar.

    By default the features are the model's projected, L2-normalised embeddings (`embed_images` / `embed_texts`).
    With `pooled=True` they are the tower's pooled output before the projection, not normalised (CLIP's linear probes
    use these).

    With `cache_dir`, the features are saved to `cache_dir/xmodal-features-<key>.safetensors`, the key being
    `features_fingerprint` (model weights and config, processor, `dataset._fingerprint`, options): a second call with
    the same model, rows and options reads the file without running the model; any change gives a new file.

    Args:
        model: an xmodal model with both towers (`XModalModel`, `XModalForPreTraining`, ...).
        processor: its `XModalProcessor`.
        dataset: rows with `image_column` (PIL images or file paths) and/or `text_column`; rows decoded lazily by
            `with_lazy_decoding` must all be decodable.
        max_length: longest text in tokens (default: the tokenizer's `model_max_length`).

    Returns:
        `torch.FloatTensor` of shape `(len(dataset), projection_dim)` (`(len(dataset), hidden_size)` with
        `pooled=True`), on the CPU; row i holds row i of `dataset`.

    Raises:
        TypeError: `dataset` is not a `datasets.Dataset`, or `pooled=True` with a model lacking the projection.
        ValueError: an unknown `modality`, a bad `batch_size`, an empty dataset, a missing column, or an undecodable
            row.
    """
    _check_choice("modality", modality, MODALITIES)
    _check_batch_size(batch_size)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"extract_features expects a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("extract_features got an empty dataset.")
    column = image_column if modality == "image" else text_column
    if column not in dataset.column_names:
        option = "image_column" if modality == "image" else "text_column"
        raise ValueError(f"{option} {column!r} is not a column of the dataset; columns: {dataset.column_names}.")

    cache_file = fingerprint = None
    if cache_dir is not None:
        fingerprint = features_fingerprint(
            model, processor, dataset, modality=modality, pooled=pooled, column=column, max_length=max_length
        )
        cache_file = Path(cache_dir) / f"{FEATURES_CACHE_PREFIX}{fingerprint[:32]}.safetensors"
        cached = _read_features(cache_file, fingerprint, len(dataset))
        if cached is not None:
            return cached

    was_training = model.training
    try:
        if pooled:
            with _projection_inputs(model, modality) as captured:
                _embed_column(model, processor, dataset, modality, column, batch_size, max_length, show_progress)
            features = torch.cat(captured)
        else:
            features = _embed_column(
                model, processor, dataset, modality, column, batch_size, max_length, show_progress
            )
    finally:
        model.train(was_training)
    if cache_file is not None:
        _write_cache(cache_file, fingerprint, [], features)
    return features


# ----------------------------------------------------------------------------------------------------------------
# Logistic-regression probes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LinearProbe:
    """A multinomial logistic-regression classifier on frozen features: `logits = features @ weight.T + bias`.

    Attributes:
        weight (`torch.FloatTensor` of shape `(num_classes, num_features)`).
        bias (`torch.FloatTensor` of shape `(num_classes,)`).
        l2: the L2 strength it was fitted with (penalty `l2 / 2 * ||weight||^2`, the bias unpenalised).
        val_accuracy: its top-1 accuracy on the validation rows that picked `l2` (None when fitted without them).
        l2_search: `{l2: validation accuracy}` of every strength tried by `fit_linear_probe`, by increasing `l2`.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    val_accuracy: float | None = None
    l2_search: dict[float, float] = field(default_factory=dict)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores `(num_rows, num_classes)` of features `(num_rows, num_features)`."""
        if features.ndim != 2 or features.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"The probe takes features of shape (num_rows, {self.weight.shape[1]}), got {tuple(features.shape)}."
            )
        with torch.no_grad():
            return features.to(self.weight) @ self.weight.t() + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted class indices `(num_rows,)` (int64) of features `(num_rows, num_features)`."""
        return self.logits(features).argmax(dim=-1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
        """Top-1 accuracy in [0, 1] on features `(num_rows, num_features)` with class indices `(num_rows,)`."""
        features, labels = _check_features_and_labels(features, labels, "")
        return float((self.predict(features) == labels.to(self.weight.device)).double().mean())


def _check_features_and_labels(
    features: torch.Tensor, labels: torch.Tensor | Sequence[int], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 features `(N, D)` and int64 labels `(N,)` on the features' device, checked."""
    prefix = f"{name}_" if name else ""
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{prefix}features must be a 2-D tensor (num_rows, num_features), got {shape}.")
    labels = torch.as_tensor(labels)
    if len(features) == 0 or labels.numel() == 0:
        raise ValueError(f"{prefix}features and {prefix}labels must not be empty.")
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(
            f"{prefix}labels must be a 1-D sequence of integer class indices, got dtype {labels.dtype} and shape "
            f"{tuple(labels.shape)}."
        )
    if len(features) != len(labels):
        raise ValueError(
            f"{prefix}features and {prefix}labels differ in length: {len(features)} rows vs {len(labels)} labels."
        )
    if labels.min() < 0:
        raise ValueError(f"{prefix}labels must be class indices >= 0, got {int(labels.min())}.")
    if not torch.isfinite(features).all():
        raise ValueError(f"{prefix}features hold NaN or infinite values.")
    return features.float(), labels.long().to(features.device)


def _objective(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, l2: float
) -> torch.Tensor:
    """Mean cross-entropy plus `l2 / 2 * ||weight||^2`."""
    return F.cross_entropy(features @ weight.t() + bias, labels) + 0.5 * l2 * weight.pow(2).sum()


def _check_l2(l2: float) -> float:
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 <= 0:
        raise ValueError(f"L2 strengths must be positive finite numbers, got {l2!r}.")
    return float(l2)


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    l2: float,
    *,
    num_classes: int | None = None,
    method: ProbeMethod = "lbfgs",
    max_iter: int = 1000,
    lr: float = 0.05,
    batch_size: int | None = None,
    seed: int = 0,
    init: LinearProbe | None = None,
) -> LinearProbe:
    """Fits one multinomial logistic regression with a fixed L2 strength, minimising
    `mean cross-entropy + l2 / 2 * ||weight||^2` (the bias is not penalised) on the features' device.

    Methods:
        - `"lbfgs"`: full-batch `torch.optim.LBFGS` with a strong Wolfe line search, up to `max_iter` iterations (the
          standard for linear probes; deterministic).
        - `"adamw"`: `torch.optim.AdamW` for `max_iter` steps at learning rate `lr` with cosine decay, on the full
          batch or on shuffled minibatches of `batch_size` rows (drawn with `seed`), for feature sets too large for
          full-batch L-BFGS. The L2 term is part of the loss and AdamW's decoupled weight decay is off, so both
          methods minimise the same objective and `l2` means the same thing.

    Args:
        features (`torch.FloatTensor` of shape `(num_rows, num_features)`).
        labels (`torch.LongTensor` of shape `(num_rows,)`): class indices in `[0, num_classes)`.
        num_classes: default `labels.max() + 1`.
        init: start from this probe's weights (warm start) instead of zeros.

    Returns:
        A `LinearProbe` (with `val_accuracy=None`).
    """
    features, labels = _check_features_and_labels(features, labels, "")
    l2 = _check_l2(l2)
    _check_choice("method", method, PROBE_METHODS)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if num_classes <= int(labels.max()):
        raise ValueError(f"num_classes={num_classes} is too small for class index {int(labels.max())}.")
    shape = (num_classes, features.shape[1])
    if init is not None and tuple(init.weight.shape) != shape:
        raise ValueError(f"init has weights of shape {tuple(init.weight.shape)}, expected {shape}.")
    weight = (init.weight.clone() if init is not None else torch.zeros(shape)).to(features).requires_grad_()
    bias = (init.bias.clone() if init is not None else torch.zeros(num_classes)).to(features).requires_grad_()

    with torch.enable_grad():
        if method == "lbfgs":
            optimizer = torch.optim.LBFGS(
                [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
            )

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = _objective(weight, bias, features, labels, l2)
                loss.backward()
                return loss

            optimizer.step(closure)
        else:
            if batch_size is not None:
                _check_batch_size(batch_size)
            optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_iter)
            for rows in _minibatches(len(features), batch_size, max_iter, seed):
                optimizer.zero_grad()
                _objective(weight, bias, features[rows], labels[rows], l2).backward()
                optimizer.step()
                scheduler.step()
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise RuntimeError(
            f"The {method} fit diverged (non-finite weights) at l2={l2}; lower lr or scale the features."
        )
    return LinearProbe(weight=weight.detach(), bias=bias.detach(), l2=l2)


def _minibatches(num_rows: int, batch_size: int | None, steps: int, seed: int) -> Iterator[torch.Tensor | slice]:
    """`steps` row selections: everything (`batch_size` None or >= `num_rows`), or consecutive slices of a fresh
    permutation (drawn with `seed`) per pass over the rows."""
    if batch_size is None or batch_size >= num_rows:
        for _ in range(steps):
            yield slice(None)
        return
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(num_rows, generator=generator), 0
    for _ in range(steps):
        if position + batch_size > num_rows:
            order, position = torch.randperm(num_rows, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int],
    val_features: torch.Tensor,
    val_labels: torch.Tensor | Sequence[int],
    *,
    method: ProbeMethod = "lbfgs",
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    refine_steps: int = 2,
    max_iter: int = 1000,
    lr: float = 0.05,
    batch_size: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> LinearProbe:
    """A logistic-regression probe fitted on the train rows, with its L2 strength picked on the validation rows.

    Every strength of `l2_grid` is fitted (`fit_logistic_regression`), from the strongest to the weakest, each fit
    starting from the previous solution; then, `refine_steps` times, the geometric midpoints between the best strength
    and its tried neighbours are fitted too (CLIP's coarse sweep then refinement). The best strength has the highest
    validation accuracy, ties going to the lowest validation cross-entropy (then to the stronger L2).

    Args:
        train_features (`torch.FloatTensor` of shape `(num_train, num_features)`).
        train_labels (`torch.LongTensor` of shape `(num_train,)`): class indices, at least two classes.
        val_features (`torch.FloatTensor` of shape `(num_val, num_features)`).
        val_labels (`torch.LongTensor` of shape `(num_val,)`).
        l2_grid: positive L2 strengths (log-spaced: refinement takes geometric midpoints).
        num_classes: default: the largest class index of either split, plus one.
        method, max_iter, lr, batch_size, seed: see `fit_logistic_regression`.

    Returns:
        The `LinearProbe` of the chosen strength, with `val_accuracy` and `l2_search` (every strength tried).

    Raises:
        ValueError: empty, mismatched or non-finite inputs, train and validation features of different widths, a
            single class in the train labels, or an empty or non-positive `l2_grid`.
    """
    train_features, train_labels = _check_features_and_labels(train_features, train_labels, "train")
    val_features, val_labels = _check_features_and_labels(val_features, val_labels, "val")
    if train_features.shape[1] != val_features.shape[1]:
        raise ValueError(
            f"train_features and val_features differ in width: {train_features.shape[1]} vs {val_features.shape[1]}."
        )
    if len(train_labels.unique()) < 2:
        raise ValueError(f"train_labels hold a single class ({int(train_labels[0])}): a probe needs at least two.")
    if isinstance(l2_grid, (int, float)) or not l2_grid:
        raise ValueError(f"l2_grid must be a non-empty sequence of positive L2 strengths, got {l2_grid!r}.")
    grid = sorted({_check_l2(l2) for l2 in l2_grid}, reverse=True)
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps must be a non-negative integer, got {refine_steps!r}.")
    largest = max(int(train_labels.max()), int(val_labels.max()))
    num_classes = largest + 1 if num_classes is None else num_classes
    if num_classes <= largest:
        raise ValueError(f"num_classes={num_classes} is too small for class index {largest}.")
    val_labels = val_labels.to(train_features.device)
    options = {"num_classes": num_classes, "method": method, "max_iter": max_iter, "lr": lr, "batch_size": batch_size}
    tried: dict[float, tuple[float, float, LinearProbe]] = {}  # l2 -> (val accuracy, val cross-entropy, probe)

    def try_l2(l2: float, init: LinearProbe | None) -> LinearProbe:
        probe = fit_logistic_regression(train_features, train_labels, l2, seed=seed, init=init, **options)
        logits = probe.logits(val_features)
        accuracy = float((logits.argmax(dim=-1) == val_labels).double().mean())
        tried[l2] = (accuracy, float(F.cross_entropy(logits, val_labels)), probe)
        return probe

    def best() -> float:
        return max(tried, key=lambda l2: (tried[l2][0], -tried[l2][1], l2))

    previous = None
    for l2 in grid:
        previous = try_l2(l2, previous)
    chosen = best()
    for _ in range(refine_steps):
        strengths = sorted(tried)
        position = strengths.index(chosen)
        neighbours = [strengths[i] for i in (position - 1, position + 1) if 0 <= i < len(strengths)]
        for neighbour in neighbours:
            try_l2(math.sqrt(chosen * neighbour), tried[chosen][2])
        chosen = best()
    accuracy, _, probe = tried[chosen]
    return replace(probe, val_accuracy=accuracy, l2_search={l2: tried[l2][0] for l2 in sorted(tried)})


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------------------------


def _label_indices(
    train_values: list[Any], test_values: list[Any], label_column: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class indices of both splits: integer labels (e.g. a `ClassLabel`) as they are, names numbered in sorted order
    over both splits (a class only the test split has is one the probe never predicts)."""
    values = train_values + test_values
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        if min(values) < 0:
            raise ValueError(f"Label column {label_column!r} holds negative class indices (missing labels?).")
        return torch.tensor(train_values), torch.tensor(test_values)
    if all(isinstance(value, str) for value in values):
        index = {name: position for position, name in enumerate(sorted(set(values)))}
        return torch.tensor([index[value] for value in train_values]), torch.tensor([index[v] for v in test_values])
    kinds = sorted({type(value).__name__ for value in values})
    raise TypeError(f"Label column {label_column!r} must hold class indices or class names, got {', '.join(kinds)}.")


def linear_probe_evaluation(
    model: XModalModel,
    processor: XModalProcessor,
    train_dataset: Dataset,
    test_dataset: Dataset,
    label_column: str,
    *,
    validation_fraction: float = 0.2,
    modality: Modality = "image",
    pooled: bool = False,
    batch_size: int = 128,
    image_column: str = "image",
    text_column: str = "text",
    max_length: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    method: ProbeMethod = "lbfgs",
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    refine_steps: int = 2,
    max_iter: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, float]:
    """Linear-probe evaluation of a model's frozen features on a labelled dataset (CLIP's protocol).

    1. Features of every row of both splits (`extract_features`, cached with `cache_dir`).
    2. A random `validation_fraction` of the train rows (drawn with `seed`) is held out, and `fit_linear_probe` picks
       the L2 strength on it.
    3. The final probe is refitted on all the train rows (train + validation) with that strength, and scored on the
       test split.

    `label_column` holds class indices (a `ClassLabel` or integers) or class names in both splits.

    Returns:
        `{"linear_probe_accuracy": test top-1 in [0, 1], "linear_probe_l2": the chosen strength,
        "linear_probe_val_accuracy": validation top-1 at that strength, "linear_probe_train_rows": len(train_dataset)}`.

    Raises:
        ValueError: `label_column` missing from a split, fewer than two train rows, `validation_fraction` outside
            (0, 1), or any error of `extract_features` / `fit_linear_probe`.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
    for name, dataset in (("train_dataset", train_dataset), ("test_dataset", test_dataset)):
        if isinstance(dataset, Dataset) and label_column not in dataset.column_names:
            raise ValueError(
                f"label_column {label_column!r} is not a column of {name}; columns: {dataset.column_names}."
            )
    options = {
        "modality": modality,
        "pooled": pooled,
        "batch_size": batch_size,
        "image_column": image_column,
        "text_column": text_column,
        "max_length": max_length,
        "cache_dir": cache_dir,
        "show_progress": show_progress,
    }
    train_features = extract_features(model, processor, train_dataset, **options)
    test_features = extract_features(model, processor, test_dataset, **options)
    num_rows = len(train_features)
    if num_rows < 2:
        raise ValueError(f"The linear probe needs at least two train rows (one to validate), got {num_rows}.")
    train_labels, test_labels = _label_indices(
        list(train_dataset.with_format(None)[label_column]),
        list(test_dataset.with_format(None)[label_column]),
        label_column,
    )
    device = _first_parameter(model).device
    train_features, test_features = train_features.to(device), test_features.to(device)
    num_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    num_val = min(max(round(validation_fraction * num_rows), 1), num_rows - 1)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    val_rows, fit_rows = order[:num_val], order[num_val:]
    fit_options = {"method": method, "max_iter": max_iter, "num_classes": num_classes, "seed": seed}
    probe = fit_linear_probe(
        train_features[fit_rows],
        train_labels[fit_rows],
        train_features[val_rows],
        train_labels[val_rows],
        l2_grid=l2_grid,
        refine_steps=refine_steps,
        **fit_options,
    )
    final = fit_logistic_regression(train_features, train_labels, probe.l2, init=probe, **fit_options)
    return {
        "linear_probe_accuracy": final.accuracy(test_features, test_labels),
        "linear_probe_l2": probe.l2,
        "linear_probe_val_accuracy": probe.val_accuracy,
        "linear_probe_train_rows": num_rows,
    }


__all__ = [
    "DEFAULT_L2_GRID",
    "FEATURES_CACHE_PREFIX",
    "MODALITIES",
    "PROBE_METHODS",
    "LinearProbe",
    "extract_features",
    "features_fingerprint",
    "fit_linear_probe",
    "fit_logistic_regression",
    "linear_probe_evaluation",
]
