"""Image processing, text tokenization and the combined XModal processor."""

from .image_processing_xmodal import XModalImageProcessor
from .processing_xmodal import XModalProcessor
from .tokenization import load_tokenizer, train_tokenizer

__all__ = ["XModalImageProcessor", "XModalProcessor", "load_tokenizer", "train_tokenizer"]
