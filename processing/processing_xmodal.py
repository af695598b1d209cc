"""Processor for XModal: wraps an image processor and a tokenizer into a single callable.

This file is shipped as remote code on the Hub: it imports only the standard library and transformers.
"""


from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase, TextInput
from transformers.utils import PaddingStrategy, TensorType

from xmodal.hub import RemoteCodeSaveMixin


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
                The captions, passed to the tokenizer. When `images` and `text` are both lists, their lengths must
                match (one caption per image).
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

        Returns:
            `BatchFeature` with, for text, `input_ids` and `attention_mask` of shape `(batch_size, sequence_length)`
            (plus `token_type_ids` when the tokenizer returns them) and, for images, `pixel_values` of shape
            `(num_images, 3, height, width)`.

        Raises:
            ValueError: if neither `images` nor `text` is given, or both are lists of different lengths.
        """
        if isinstance(text, tuple):
            text = list(text)
        if isinstance(text, list) and isinstance(images, (list, tuple)) and len(text) != len(images):
            raise ValueError(
                f"Got {len(images)} images and {len(text)} texts: when both are lists they must have the same length "
                "(one caption per image). To score images against a different number of captions, process them in "
                "separate calls."
            )
        return super().__call__(
            images=images,
            text=text,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **kwargs,
        )


__all__ = ["XModalProcessor"]
