"""Using a pretrained model: embeddings, zero-shot classification with prompts, and text <-> image retrieval over
an indexed image folder or a gallery too large for one similarity matrix."""

from .embeddings import ImageInput, embed_images, embed_texts, load_image
from .index import (
    CACHE_PREFIX,
    IMAGE_EXTENSIONS,
    ImageFolderIndex,
    embedding_fingerprint,
    index_image_folder,
    list_images,
    rank_images,
    rank_texts,
    text_fingerprint,
)
from .search import chunked_topk
from .zero_shot import DEFAULT_TEMPLATES, ZeroShotClassifier, check_labels, check_templates, ensemble_text_embeddings

__all__ = [
    "CACHE_PREFIX",
    "DEFAULT_TEMPLATES",
    "IMAGE_EXTENSIONS",
    "ImageFolderIndex",
    "ImageInput",
    "ZeroShotClassifier",
    "check_labels",
    "check_templates",
    "chunked_topk",
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
