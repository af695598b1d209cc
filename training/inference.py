"""Inference with a pretrained xmodal model: zero-shot image classification with prompt ensembles (CLIP) or learned
prompts (CoOp, see `xmodal.training.prompt_learning`), and text <-> image retrieval over a folder of images with an
on-disk embedding cache.

```python
>>> classifier = ZeroShotClassifier(model, processor, ["cat", "dog", "car"])  # embeds the labels once
>>> classifier.classify(["photo.jpg"], top_k=2)
[[('cat', 0.91), ('dog', 0.07)]]
>>> index = index_image_folder(model, processor, "holiday/")  # cached in holiday/.xmodal-embeddings-*.safetensors
>>> rank_images(model, processor, "a boat at sunset", index, top_k=3)
[('holiday/day2/IMG_0042.jpg', 0.31), ...]
```

Every function reads the model through the `XModalModel` API (`get_image_features`, `get_text_features`, `logits`),
so any xmodal model with both towers works (`XModalModel`, `XModalForPreTraining`, `XModalForImageTextRetrieval`).
Embeddings are returned L2-normalised, as float32 tensors on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xmodal import XModalModel, XModalProcessor

if TYPE_CHECKING:
    from xmodal.training.prompt_learning import PromptLearner

logger = logging.getLogger(__name__)

ImageInput = PIL.Image.Image | str | os.PathLike
"""An image, or the path of an image file."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
"""File extensions (lower case) that `list_images` treats as images."""

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

CACHE_PREFIX = ".xmodal-embeddings-"
"""File name prefix of the embedding caches (hidden, so `list_images` never lists them)."""

_CACHE_VERSION = "1"
_PROVENANCE_KEYS = frozenset({"_name_or_path", "architectures", "auto_map", "dtype", "transformers_version"})

_Item = TypeVar("_Item")


def load_image(image: ImageInput) -> PIL.Image.Image:
    """An RGB PIL image from a PIL image or a file path (EXIF orientation applied).

    Raises:
        FileNotFoundError: the path is not a file.
        ValueError: the file is not an image PIL can read.
        TypeError: `image` is neither a PIL image nor a path.
    """
    if isinstance(image, PIL.Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"Expected a PIL image or the path of an image file, got {type(image).__name__}: {image!r}.")
    if not os.path.isfile(image):
        raise FileNotFoundError(f"Image file {os.fspath(image)!r} does not exist.")
    try:
        with PIL.Image.open(image) as opened:
            return PIL.ImageOps.exif_transpose(opened).convert("RGB")
    except PIL.UnidentifiedImageError as err:
        raise ValueError(f"{os.fspath(image)!r} is not an image file PIL can read.") from err


def _first_parameter(model: torch.nn.Module) -> torch.Tensor:
    """Where (device) and in what dtype the model's inputs go."""
    return next(model.parameters())


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


@torch.no_grad()
def embed_images(
    model: XModalModel, processor: XModalProcessor, images: Sequence[ImageInput], batch_size: int = 32
) -> torch.Tensor:
    """L2-normalised image embeddings `(len(images), projection_dim)` (float32, CPU), in batches of `batch_size`.

    `images` are PIL images or file paths (loaded one batch at a time). Puts the model in eval mode.
    """
    _check_batch_size(batch_size)
    model.eval()
    parameter = _first_parameter(model)
    embeddings = []
    for start in range(0, len(images), batch_size):
        batch = [load_image(image) for image in images[start : start + batch_size]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(parameter.device, parameter.dtype)
        features = model.get_image_features(pixel_values=pixel_values).pooler_output
        embeddings.append(F.normalize(features.float(), dim=-1).cpu())
    if not embeddings:
        raise ValueError("embed_images got no images.")
    return torch.cat(embeddings)


@torch.no_grad()
def embed_texts(
    model: XModalModel,
    processor: XModalProcessor,
    texts: Sequence[str],
    batch_size: int = 256,
    max_length: int | None = None,
) -> torch.Tensor:
    """L2-normalised text embeddings `(len(texts), projection_dim)` (float32, CPU), in batches of `batch_size`.

    Texts longer than `max_length` tokens (default: the tokenizer's `model_max_length`) are truncated. Puts the model
    in eval mode.
    """
    _check_batch_size(batch_size)
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise TypeError(f"texts must be a sequence of strings, got {texts!r}.")
    model.eval()
    device = _first_parameter(model).device
    embeddings = []
    for start in range(0, len(texts), batch_size):
        inputs = processor(
            text=list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        features = model.get_text_features(**inputs).pooler_output
        embeddings.append(F.normalize(features.float(), dim=-1).cpu())
    if not embeddings:
        raise ValueError("embed_texts got no texts.")
    return torch.cat(embeddings)


def _ranked(scores: torch.Tensor, items: Sequence[_Item], top_k: int | None) -> list[tuple[_Item, float]]:
    """`(item, score)` pairs by decreasing score `(len(items),)` (ties keep the items' order), the first `top_k`
    (all when None)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (all), got {top_k!r}.")
    order = torch.sort(scores, descending=True, stable=True).indices[:top_k].tolist()
    return [(items[index], float(scores[index])) for index in order]


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------------------------------


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
        prompts: learned prompts (a `PromptLearner` from `xmodal.training.prompt_learning.train_prompts` or
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


def list_images(folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Paths (relative to `folder`, with `/` separators, sorted) of the image files under `folder`, recursively.

    A file is an image when its extension, lower-cased, is in `extensions`. Hidden files and folders (name starting
    with `.`) are skipped.

    Raises:
        FileNotFoundError: `folder` is not a directory.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Image folder {os.fspath(folder)!r} does not exist or is not a directory.")
    extensions = tuple(extension.lower() for extension in extensions)
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(Path(directory, name).relative_to(folder).as_posix())
    return sorted(found)


def _without_provenance(value: object) -> object:
    """A config dict without the keys that record where and how it was saved, not what the model computes."""
    if isinstance(value, dict):
        return {key: _without_provenance(item) for key, item in value.items() if key not in _PROVENANCE_KEYS}
    return value


def _config_bytes(config: dict) -> bytes:
    """A config dict as canonical JSON, less the provenance keys."""
    return json.dumps(_without_provenance(config), sort_keys=True, default=str).encode()


def _hash_tensors(digest: hashlib.blake2b, tensors: dict[str, torch.Tensor]) -> None:
    """Feeds named tensors (name, dtype, size and bytes, by name) to `digest`."""
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tensor.numel()}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())


def embedding_fingerprint(model: torch.nn.Module, processor: XModalProcessor) -> str:
    """A hex digest identifying what image embeddings depend on: every weight and buffer of the model, its config
    (less provenance such as `_name_or_path`) and the image processor's settings. A model gets the same fingerprint
    wherever it is loaded from; two models get the same one only if they embed images alike."""
    digest = hashlib.blake2b(digest_size=20)
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(_config_bytes(config.to_dict()))
    digest.update(processor.image_processor.to_json_string().encode())
    _hash_tensors(digest, model.state_dict())
    return digest.hexdigest()


def text_fingerprint(model: XModalModel) -> str:
    """A hex digest identifying what text embeddings depend on: the text tower's config, `projection_dim`,
    `text_pooling` and the weights of the text tower and its projection (not the image tower). Any change of these
    (another model, further training) changes it; where the model was loaded from does not."""
    config = model.config
    text_config = {
        "text_config": config.text_config.to_dict(),
        "projection_dim": config.projection_dim,
        "text_pooling": config.text_pooling,
    }
    tensors = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if name.startswith(("text_model.", "text_projection."))
    }
    digest = hashlib.blake2b(_config_bytes(text_config), digest_size=20)
    _hash_tensors(digest, tensors)
    return digest.hexdigest()


@dataclass
class ImageFolderIndex:
    """The embeddings of the images of a folder.

    Attributes:
        root: the folder.
        paths: the image files, relative to `root` (see `list_images`).
        embeddings (`torch.FloatTensor` of shape `(len(paths), projection_dim)`): unit embeddings, row i of
            `paths[i]`.
        num_embedded: how many images were embedded by the call that built the index (the others came from the
            cache).
        cache_file: the cache file read and written (None without a cache).
    """

    root: Path
    paths: list[str]
    embeddings: torch.Tensor
    num_embedded: int
    cache_file: Path | None


def _cache_file(folder: Path, cache_dir: str | os.PathLike | None, fingerprint: str) -> Path:
    """`folder/.xmodal-embeddings-<model>.safetensors`, or in `cache_dir` one file per folder and model."""
    if cache_dir is None:
        return folder / f"{CACHE_PREFIX}{fingerprint[:16]}.safetensors"
    key = hashlib.blake2b(f"{folder.resolve()}\n{fingerprint}".encode(), digest_size=8).hexdigest()
    return Path(cache_dir) / f"{CACHE_PREFIX}{key}.safetensors"


def _read_cache(path: Path, fingerprint: str) -> dict[str, tuple[int, int, torch.Tensor]]:
    """`{relative path: (size, mtime_ns, embedding)}` from a cache file ({} when absent, stale or unreadable)."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("version") != _CACHE_VERSION or metadata.get("fingerprint") != fingerprint:
                return {}
            embeddings = handle.get_tensor("embeddings")
        entries = json.loads(metadata["files"])
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # a truncated or foreign file: a cache miss
        logger.warning(f"Ignoring the unreadable embedding cache {path}: {err}")
        return {}
    return {name: (size, mtime, row) for (name, size, mtime), row in zip(entries, embeddings)}


def _write_cache(path: Path, fingerprint: str, entries: list[tuple[str, int, int]], embeddings: torch.Tensor) -> None:
    """Writes the cache atomically; a folder we may not write to only costs the cache (logged)."""
    tmp_path = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    metadata = {"version": _CACHE_VERSION, "fingerprint": fingerprint, "files": json.dumps(entries)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": embeddings.contiguous()}, str(tmp_path), metadata=metadata)
        os.replace(tmp_path, path)
    except (OSError, SafetensorError) as err:
        logger.warning(f"Could not write the embedding cache {path}: {err}")
        tmp_path.unlink(missing_ok=True)


def index_image_folder(
    model: XModalModel,
    processor: XModalProcessor,
    folder: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageFolderIndex:
    """Embeds every image under `folder` (recursively, see `list_images`), reusing the embeddings cached by an
    earlier call for the same model.

    The cache is a safetensors file, `folder/.xmodal-embeddings-<model>.safetensors` or, with `cache_dir`, a file in
    `cache_dir` named after the folder and the model. An image is reused when its relative path, size and
    modification time match the cache and the model's `embedding_fingerprint` is the cache's; new and changed files
    are embedded, deleted ones dropped, and the cache rewritten when anything changed. Files PIL cannot read are
    skipped with a warning.

    Raises:
        FileNotFoundError: `folder` is not a directory.
        ValueError: `folder` holds no readable image.
    """
    _check_batch_size(batch_size)
    root = Path(folder)
    names = list_images(root, extensions)
    if not names:
        raise ValueError(f"No image files ({', '.join(extensions)}) under {os.fspath(folder)!r}.")
    stats = {name: (root / name).stat() for name in names}
    fingerprint = embedding_fingerprint(model, processor) if use_cache else ""
    cache_file = _cache_file(root, cache_dir, fingerprint) if use_cache else None
    cached = _read_cache(cache_file, fingerprint) if cache_file is not None else {}

    rows: dict[str, torch.Tensor] = {}
    for name in names:
        entry = cached.get(name)
        if entry is not None and entry[:2] == (stats[name].st_size, stats[name].st_mtime_ns):
            rows[name] = entry[2]
    pending = [name for name in names if name not in rows]
    num_embedded = 0
    for start in range(0, len(pending), batch_size):
        images, loaded = [], []
        for name in pending[start : start + batch_size]:
            try:
                images.append(load_image(root / name))
                loaded.append(name)
            except (ValueError, OSError) as err:
                logger.warning(f"Skipping {root / name}: {err}")
        if images:
            rows.update(zip(loaded, embed_images(model, processor, images, batch_size=batch_size)))
            num_embedded += len(loaded)
    names = [name for name in names if name in rows]
    if not names:
        raise ValueError(f"None of the image files under {os.fspath(folder)!r} could be read.")
    embeddings = torch.stack([rows[name] for name in names])
    if cache_file is not None and (num_embedded or set(cached) != set(names)):
        entries = [(name, stats[name].st_size, stats[name].st_mtime_ns) for name in names]
        _write_cache(cache_file, fingerprint, entries, embeddings)
    return ImageFolderIndex(
        root=root, paths=names, embeddings=embeddings, num_embedded=num_embedded, cache_file=cache_file
    )


def rank_images(
    model: XModalModel,
    processor: XModalProcessor,
    query: str,
    index: ImageFolderIndex,
    top_k: int | None = 10,
) -> list[tuple[str, float]]:
    """Text -> image retrieval: the `top_k` images of `index` (all when None) most similar to `query`, as
    `(path, cosine similarity)` pairs by decreasing similarity; paths are `index.root` joined with the file."""
    query_embedding = embed_texts(model, processor, [query])[0]
    paths = [os.path.join(index.root, name) for name in index.paths]
    return _ranked(index.embeddings @ query_embedding, paths, top_k)


def rank_texts(
    model: XModalModel,
    processor: XModalProcessor,
    image: ImageInput,
    texts: Sequence[str],
    top_k: int | None = None,
    batch_size: int = 256,
) -> list[tuple[str, float]]:
    """Image -> text retrieval: the `top_k` of `texts` (all when None) most similar to `image` (a PIL image or a
    path), as `(text, cosine similarity)` pairs by decreasing similarity."""
    if not texts:
        raise ValueError("rank_texts needs at least one text.")
    image_embedding = embed_images(model, processor, [image])[0]
    text_embeddings = embed_texts(model, processor, texts, batch_size=batch_size)
    return _ranked(text_embeddings @ image_embedding, list(texts), top_k)


__all__ = [
    "CACHE_PREFIX",
    "DEFAULT_TEMPLATES",
    "IMAGE_EXTENSIONS",
    "ImageFolderIndex",
    "ImageInput",
    "ZeroShotClassifier",
    "check_labels",
    "check_templates",
    "embed_images",
    "embed_texts",
    "embedding_fingerprint",
    "ensemble_text_embeddings",
    "index_image_folder",
    "list_images",
    "load_image",
    "rank_images",
    "rank_texts",
    "text_fingerprint",
]
