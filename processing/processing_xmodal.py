"""Processor for XModal: wraps an image processor and a tokenizer into a single callable.

This file is shipped as remote code on the Hub: it imports only the standard library, numpy, PIL, torch, transformers
and its sibling `image_processing_xmodal`.
"""

import warnings
from collections.abc import Sequence

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER, PreTrainedTokenizerBase, TextInput
from transformers.utils import PaddingStrategy, TensorType

from xmodal.hub import RemoteCodeSaveMixin
from xmodal.processing.image_processing_xmodal import _describe


def _check_texts(text: object) -> str | list[str] | None:
    """
    Validate the captions and return them as a string or a list of strings.

    Raises:
        TypeError: if `text` (or an element, named `text[i]`) is not a string.
        ValueError: if `text` is an empty list, or a string holds a lone surrogate (not encodable as UTF-8).
    """
    if text is None:
        return None
    if not isinstance(text, (str, bytes)) and isinstance(text, Sequence):
        text = list(text)  # a tuple or a `datasets` Column
        if not text:
            raise ValueError("Received an empty list of texts; expected a string or a non-empty list of strings.")
    texts = text if isinstance(text, list) else [text]
    for index, item in enumerate(texts):
        where = f"text[{index}]" if isinstance(text, list) else "text"
        if not isinstance(item, str):
            raise TypeError(f"{where} is a {_describe(item)}; expected a string (one caption).")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{where} is not valid Unicode: {err.reason} at position {err.start} ({item[err.start]!r}); decode "
                "the text with errors='replace' or remove the character."
            ) from err
    return text


class XModalProcessor(RemoteCodeSaveMixin, ProcessorMixin):
    r"""
    Processor for XModal models: an image processor (normally `XModalImageProcessor`) and a tokenizer (normally a
    WordPiece `BertTokenizer`).

    `ProcessorMixin` infers the two parts from the `__init__` parameter names: `image_processor` is (re)loaded with
    `AutoImageProcessor` and `tokenizer` with `AutoTokenizer`. `save_pretrained` writes the tokenizer files and a
    `processor_config.json` that nests the image processor settings under `"image_processor"`.

    Args:
        image_processor (`BaseImageProcessor`):
            The image processor, e.g. `XModalImageProcessor`.
        tokenizer (`PreTrainedTokenizerBase`):
            The tokenizer, e.g. the `BertTokenizer` returned by `xmodal.processing.train_tokenizer`.
        **kwargs:
            Passed to `ProcessorMixin` (e.g. `chat_template`).

    Example:

    ```python
    >>> processor = XModalProcessor(image_processor=XModalImageProcessor(), tokenizer=tokenizer)
    >>> batch = processor(images=[image_a, image_b], text=["a red cube", "two blue spheres"], return_tensors="pt")
    >>> batch["pixel_values"].shape, batch["input_ids"].shape
    (torch.Size([2, 3, 224, 224]), torch.Size([2, sequence_length]))
    ```
    """

    def __init__(
        self,
        image_processor: BaseImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | tuple[TextInput, ...] | None = None,
        padding: bool | str | PaddingStrategy = True,
        truncation: bool | str | None = True,
        max_length: int | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Tokenize `text` and preprocess `images`; either or both may be given.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                The images, passed to the image processor.
            text (`str` or a list of `str`, *optional*):
                The captions, passed to the tokenizer. Any number of texts goes with any number of images, as with
                `CLIPProcessor`: N images scored against K labels is the zero-shot call. Only a loss that pairs them
                (text i describing image i, `return_loss=True`) needs equal counts, and the model says so.
            padding (`bool`, `str` or `PaddingStrategy`, *optional*, defaults to `True`):
                Padding strategy of the tokenizer (`True`/`"longest"`, `"max_length"` or `False`).
            truncation (`bool` or `str`, *optional*, defaults to `True`):
                Truncate captions to `max_length` (or the tokenizer's `model_max_length`).
            max_length (`int`, *optional*):
                Maximum caption length in tokens, special tokens included.
            return_tensors (`str` or `TensorType`, *optional*):
                `"pt"` or `"np"` for stacked tensors; lists when unset.
            **kwargs:
                Further tokenizer or image processor keyword arguments (e.g. `do_center_crop=True`,
                `text_kwargs={...}`, `images_kwargs={...}`).

        Text handling: empty and whitespace-only captions are valid and become `[CLS] [SEP]`; the tokenizer's
        normalizer drops control characters (NUL included) and, with a lowercasing tokenizer, accents (combining
        marks); emoji, CJK and right-to-left scripts are tokenized (characters outside the vocabulary become
        `[UNK]`). With truncation (the default), captions longer than the limit (`max_length`, else the tokenizer's
        `model_max_length`, special tokens included) are cut to it and a `UserWarning` names the limit.

        Returns:
            `BatchFeature` with, for text, `input_ids` and `attention_mask` of shape `(batch_size, sequence_length)`
            (plus `token_type_ids` when the tokenizer returns them) and, for images, `pixel_values` of shape
            `(num_images, 3, height, width)`.

        Raises:
            ValueError: if neither `images` nor `text` is given, `text` is an empty list or holds invalid Unicode,
                or `max_length` cannot hold the special tokens and one token.
            TypeError: if a text is not a string (the error names it, e.g. `text[2]`).
            Image errors are raised by the image processor and name the image (e.g. `images[3]`).
        """
        text = _check_texts(text)
        if text is not None and getattr(self, "tokenizer", None) is not None:
            self._check_max_length(max_length)
            if truncation not in (False, None, "do_not_truncate"):
                self._warn_if_truncated(text if isinstance(text, list) else [text], max_length)
        return super().__call__(
            images=images,
            text=text,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **kwargs,
        )

    def _check_max_length(self, max_length: object) -> None:
        """Raise unless `max_length` is None or an integer that holds the special tokens plus one token."""
        if max_length is None:
            return
        minimum = self.tokenizer.num_special_tokens_to_add() + 1
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < minimum:
            raise ValueError(
                f"max_length must be an integer >= {minimum} (the tokenizer's "
                f"{minimum - 1} special tokens plus one token), got {max_length!r}."
            )

    def _warn_if_truncated(self, texts: list[str], max_length: int | None) -> None:
        """Warn, naming the limit, when truncation will cut a caption (a second, unpadded tokenization)."""
        limit = max_length if max_length is not None else self.tokenizer.model_max_length
        if limit is None or limit >= VERY_LARGE_INTEGER:
            return
        encoded = self.tokenizer(
            texts,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        if any(len(ids) > limit for ids in encoded):
            warnings.warn(
                f"Texts longer than {limit} tokens (special tokens included) are truncated to {limit} tokens "
                "(max_length, else the tokenizer's model_max_length); pass a larger max_length, at most the model's "
                "text_config.max_position_embeddings, to keep more.",
                UserWarning,
                stacklevel=3,
            )


__all__ = ["XModalProcessor"]
