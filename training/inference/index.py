"""Text <-> image retrieval over a folder of images, with an on-disk embedding cache keyed by the model's
fingerprint.

```python
>>> index = index_image_folder(model, processor, "holiday/")  # cached in holiday/.xmodal-embeddings-*.safetensors
>>> rank_images(model, processor, "a boat at sunset", index, top_k=3)
[('holiday/day2/IMG_0042.jpg', 0.31), ...]
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xmodal import XModalModel, XModalProcessor
from xmodal.training.inference.embeddings import (
    ImageInput,
    _check_batch_size,
    _check_top_k,
    _ranked,
    embed_images,
    embed_texts,
    load_image,
)
from xmodal.training.inference.search import chunked_topk

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
"""File extensions (lower case) that `list_images` treats as images."""


CACHE_PREFIX = ".xmodal-embeddings-"
"""File name prefix of the embedding caches (hidden, so `list_images` never lists them)."""

_CACHE_VERSION = "1"
_PROVENANCE_KEYS = frozenset({"_name_or_path", "architectures", "auto_map", "dtype", "transformers_version"})


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
    backend: str = "auto",
) -> list[tuple[str, float]]:
    """Text -> image retrieval: the `top_k` images of `index` (all when None) most similar to `query`, as
    `(path, cosine similarity)` pairs by decreasing similarity; paths are `index.root` joined with the file.

    A `top_k` search runs in bounded memory over any gallery size: `chunked_topk` with `backend` (auto: faiss's exact
    inner-product search when `faiss-cpu` is installed, else torch)."""
    query_embedding = embed_texts(model, processor, [query])
    paths = [os.path.join(index.root, name) for name in index.paths]
    return _top(query_embedding, index.embeddings, paths, top_k, backend)


def _top(
    query: torch.Tensor, gallery: torch.Tensor, items: Sequence[str], top_k: int | None, backend: str
) -> list[tuple[str, float]]:
    """The `top_k` of `items` (rows of `gallery` `(N, D)`) by dot product with `query` `(1, D)`, best first (all,
    fully sorted, when None)."""
    _check_top_k(top_k)
    if top_k is None or top_k >= len(items):
        return _ranked(gallery @ query[0], items, top_k)
    scores, indices = chunked_topk(query, gallery, top_k, backend=backend)
    return [(items[index], score) for index, score in zip(indices[0].tolist(), scores[0].tolist())]


def rank_texts(
    model: XModalModel,
    processor: XModalProcessor,
    image: ImageInput,
    texts: Sequence[str],
    top_k: int | None = None,
    batch_size: int = 256,
    backend: str = "auto",
) -> list[tuple[str, float]]:
    """Image -> text retrieval: the `top_k` of `texts` (all when None) most similar to `image` (a PIL image or a
    path), as `(text, cosine similarity)` pairs by decreasing similarity (`backend` as in `rank_images`)."""
    if not texts:
        raise ValueError("rank_texts needs at least one text.")
    image_embedding = embed_images(model, processor, [image])
    text_embeddings = embed_texts(model, processor, texts, batch_size=batch_size)
    return _top(image_embedding, text_embeddings, list(texts), top_k, backend)


__all__ = [
    "CACHE_PREFIX",
    "IMAGE_EXTENSIONS",
    "ImageFolderIndex",
    "embedding_fingerprint",
    "index_image_folder",
    "list_images",
    "rank_images",
    "rank_texts",
    "text_fingerprint",
]
