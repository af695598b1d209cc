"""Rows -> model inputs for pretraining: the collator (captions, questions, train-time augmentation, second views)
and the second views' augmentations (`--multiview`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from xmodal import XModalConfig, XModalProcessor
from xmodal.training.data.augmentations import ImageAugmentation, PairAugmentation, TextAugmentation
from xmodal.training.data.negatives import WordSwapNegatives


class ImageTextCollator:
    """Turns rows `{"image": PIL.Image, "text": str, ...}` into model inputs with the processor (runs in DataLoader
    workers): `pixel_values` `(B, 3, H, W)`, `input_ids`/`attention_mask` `(B, L)`.

    With `answer_vocab`, one of each row's `questions` is drawn (its answer from `answers`) and tokenized as
    `question_input_ids`/`question_attention_mask` `(B, Lq)`, with `vqa_labels` `(B,)` indexing `answer_vocab`.
    With `augmentation` (train time), each pair may be flipped (its caption, question and answer mirrored with it)
    and each image is augmented. With `image_augmentation`/`text_augmentation`, a second view of each pair is added
    as `second_view_*`, augmented from the (flipped, not otherwise augmented) image and the caption.
    With `hard_negatives`, `num_hard_negatives` word-swapped negatives of the first captions that have one (cycled when
    fewer have one, so every batch has the same count) are added as `negative_input_ids`/`negative_attention_mask`
    `(K, Ln)`.
    Random draws use torch's global RNG, which `SeededCollate` seeds from the batch's rows.
    """

    def __init__(
        self,
        processor: XModalProcessor,
        max_length: int,
        image_column: str = "image",
        text_column: str = "text",
        answer_vocab: list[str] | None = None,
        augmentation: PairAugmentation | None = None,
        image_augmentation: ImageAugmentation | None = None,
        text_augmentation: TextAugmentation | None = None,
        hard_negatives: WordSwapNegatives | None = None,
        num_hard_negatives: int = 0,
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.image_column = image_column
        self.text_column = text_column
        self.answer_index = {answer: index for index, answer in enumerate(answer_vocab)} if answer_vocab else None
        self.augmentation = augmentation
        self.image_augmentation = image_augmentation
        self.text_augmentation = text_augmentation
        self.hard_negatives = hard_negatives if num_hard_negatives > 0 else None
        self.num_hard_negatives = num_hard_negatives

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.processor.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        augmentation = self.augmentation or PairAugmentation(horizontal_flip="off")
        flips = augmentation.draw_flips(len(rows))
        texts = augmentation.mirror_texts([row[self.text_column] for row in rows], flips)
        batch = dict(
            self.processor(
                images=[row[self.image_column] for row in rows],
                text=texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        if self.answer_index is not None:
            questions, answers = [], []
            for row in rows:
                pick = int(torch.randint(len(row["questions"]), ()))
                questions.append(row["questions"][pick])
                answers.append(row["answers"][pick])
            questions, answers = augmentation.mirror_texts(questions, flips), augmentation.mirror_texts(answers, flips)
            for question, answer in zip(questions, answers):
                if answer not in self.answer_index:
                    raise ValueError(f"Answer {answer!r} (to {question!r}) is not in the answer vocabulary.")
            question = self._tokenize(questions)
            batch["question_input_ids"] = question["input_ids"]
            batch["question_attention_mask"] = question["attention_mask"]
            batch["vqa_labels"] = torch.tensor([self.answer_index[answer] for answer in answers])
        if self.hard_negatives is not None:
            negatives = self.hard_negatives(texts, self.num_hard_negatives)
            if not negatives:
                raise ValueError(
                    "No caption of the batch contains a word of the swappable groups (--hard_negative_words "
                    f"{'|'.join(','.join(group) for group in self.hard_negatives.groups)}), e.g. {texts[0]!r}."
                )
            negative = self._tokenize([negatives[i % len(negatives)] for i in range(self.num_hard_negatives)])
            batch["negative_input_ids"] = negative["input_ids"]
            batch["negative_attention_mask"] = negative["attention_mask"]
        flipped = augmentation.flip_images(batch["pixel_values"], flips)
        batch["pixel_values"] = augmentation.image(flipped) if augmentation.image is not None else flipped
        if self.image_augmentation is not None:
            batch["second_view_pixel_values"] = self.image_augmentation(flipped)
        if self.text_augmentation is not None:
            ids, mask = self.text_augmentation(batch["input_ids"], batch["attention_mask"])
            batch["second_view_input_ids"], batch["second_view_attention_mask"] = ids, mask
        return batch


def second_view_image_augmentation(processor: XModalProcessor, config: XModalConfig) -> ImageAugmentation:
    """The second view's augmentation (`--multiview`): mild, since the captions name positions."""
    image_processor = processor.image_processor
    return ImageAugmentation(
        crop_scale=(0.8, 1.0),
        patch_size=config.vision_config.patch_size,
        image_mean=tuple(image_processor.image_mean),
        image_std=tuple(image_processor.image_std),
    )


def second_view_text_augmentation(tokenizer: PreTrainedTokenizerBase) -> TextAugmentation:
    """The second view's text augmentation (`--multiview`): masking that never touches the special tokens."""
    special = (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id)
    return TextAugmentation(
        mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id, special_token_ids=special
    )


__all__ = ["ImageTextCollator", "second_view_image_augmentation", "second_view_text_augmentation"]
