"""Hard negative captions (NegCLIP word swaps): the swaps, the collator, the loss and the model's use of them."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import XModalModelTester

from xmodal import XModalForPreTraining
from xmodal.losses import contrastive_loss, contrastive_loss_with_negative_texts
from xmodal.training.data.negatives import WordSwapNegatives
from xmodal.training.data.synthetic import COLORS, SHAPES
from xmodal.training.losses import ContrastiveLoss

SWAPS = WordSwapNegatives([SHAPES, tuple(COLORS)])
CAPTION = "A red circle at the top left and a small blue star in the center."
ONLY_CONTRASTIVE = {f"{name}_loss_weight": 0 for name in ("itm", "mlm", "mim", "captioning", "vqa")}


def test_a_negative_swaps_one_word_for_another_of_its_group_absent_from_the_caption():
    torch.manual_seed(0)
    words = re.findall(r"\w+", CAPTION.lower())
    seen = set()
    for _ in range(50):
        negative = SWAPS.negative(CAPTION)
        changed = [(a, b) for a, b in zip(words, re.findall(r"\w+", negative.lower()), strict=True) if a != b]
        assert len(changed) == 1
        ((old, new),) = changed
        group = SHAPES if old in SHAPES else tuple(COLORS)
        assert new in group and new not in words
        seen.add(old)
    assert seen == {"red", "circle", "blue", "star"}  # every swappable occurrence is drawn
    assert WordSwapNegatives([("red", "blue")]).negative("Red circle.") == "Blue circle."
    assert SWAPS.negative("nothing to swap here") is None


def test_negatives_are_deterministic_under_a_seed_and_skip_captions_without_a_group_word():
    texts = ["no shape", CAPTION, "a green cross on the right", "a cyan diamond"]
    torch.manual_seed(3)
    first = SWAPS(texts, 2)
    torch.manual_seed(3)
    assert SWAPS(texts, 2) == first and len(first) == 2
    assert WordSwapNegatives.parse("circle, star|red,blue").groups == [("circle", "star"), ("red", "blue")]


@pytest.mark.parametrize(
    "groups, message",
    [([], "at least one group"), ([("red",)], "2 or more"), ([("red", "blue"), ("blue", "green")], "two groups")],
)
def test_bad_word_groups_are_refused_with_the_reason(groups, message):
    with pytest.raises(ValueError, match=message):
        WordSwapNegatives(groups)


def test_the_negatives_loss_is_cross_entropy_with_extra_image_to_text_columns():
    torch.manual_seed(0)
    logits, negatives = torch.randn(5, 5), torch.randn(5, 3)
    labels = torch.arange(5)
    expected = (F.cross_entropy(torch.cat([logits.t(), negatives], 1), labels) + F.cross_entropy(logits, labels)) / 2
    torch.testing.assert_close(contrastive_loss_with_negative_texts(logits, negatives), expected)
    # negatives that score far below every pair change nothing; any real negative raises the loss
    torch.testing.assert_close(contrastive_loss_with_negative_texts(logits, negatives - 1e4), contrastive_loss(logits))
    assert contrastive_loss_with_negative_texts(logits, negatives) > contrastive_loss(logits)
    with pytest.raises(ValueError, match="num_negatives"):
        contrastive_loss_with_negative_texts(logits, torch.randn(4, 3))


@pytest.mark.parametrize("local_loss", [False, True])
def test_contrastive_loss_module_with_negatives_matches_the_model_loss(local_loss):
    tester = XModalModelTester(batch_size=4)
    torch.manual_seed(0)
    model = XModalForPreTraining(tester.get_config(**ONLY_CONTRASTIVE)).eval()
    inputs = tester.get_inputs()
    negatives = tester.get_inputs(seed=1)
    extra = {
        "negative_input_ids": negatives["input_ids"][:2],
        "negative_attention_mask": negatives["attention_mask"][:2],
    }
    inside = model(**inputs, **extra, return_loss=True).loss
    outside = model(**inputs, **extra, return_loss=True, contrastive_loss_fn=ContrastiveLoss(local_loss=local_loss))
    torch.testing.assert_close(outside.loss, inside)
    assert inside > model(**inputs, return_loss=True).loss


def test_the_negative_captions_train_the_text_tower():
    tester = XModalModelTester(batch_size=3)
    torch.manual_seed(0)
    model = XModalForPreTraining(tester.get_config(**ONLY_CONTRASTIVE))
    inputs, negatives = tester.get_inputs(), tester.get_inputs(seed=1)
    ids = negatives["input_ids"].clone()
    ids[:, 1] = tester.vocab_size - 1  # a token that no caption has
    model(**inputs, negative_input_ids=ids, negative_attention_mask=negatives["attention_mask"], return_loss=True)[
        "loss"
    ].backward()
    embedding = model.text_model.embeddings.word_embeddings.weight.grad
    assert embedding[tester.vocab_size - 1].abs().sum() > 0 and torch.isfinite(embedding).all()


def test_the_collator_adds_a_fixed_number_of_negatives(tmp_path):
    from xmodal.processing import load_tokenizer
    from xmodal.training.data.collate import ImageTextCollator
    from xmodal.training.data.synthetic import make_synthetic_dataset
    from xmodal.training.pretraining.arguments import PretrainArguments
    from xmodal.training.pretraining.builders import build_processor, hard_negatives

    rows = list(make_synthetic_dataset(num_train=4, num_validation=0, num_test=0, image_size=16)["train"])
    tokenizer = load_tokenizer("training/assets/demo-tokenizer")
    processor = build_processor(tokenizer, XModalModelTester(image_size=16).get_config())
    args = PretrainArguments(output_dir=str(tmp_path), hard_negative_captions=6)
    collator = ImageTextCollator(processor, 40, hard_negatives=hard_negatives(args), num_hard_negatives=6)
    batch = collator(rows)
    assert batch["negative_input_ids"].shape[0] == 6 == batch["negative_attention_mask"].shape[0]
    texts = tokenizer.batch_decode(batch["negative_input_ids"], skip_special_tokens=True)
    assert not set(texts) & {row["text"].lower() for row in rows}
    with pytest.raises(ValueError, match="No caption of the batch contains a word of the swappable groups"):
        ImageTextCollator(processor, 40, hard_negatives=WordSwapNegatives([("dog", "cat")]), num_hard_negatives=2)(
            rows
        )


def test_hard_negative_options_are_checked(tmp_path):
    from xmodal.training.pretraining.arguments import PretrainArguments

    with pytest.raises(ValueError, match="--hard_negative_captions must be non-negative"):
        PretrainArguments(output_dir=str(tmp_path), hard_negative_captions=-1)
    with pytest.raises(ValueError, match="needs --hard_negative_words"):
        PretrainArguments(output_dir=str(tmp_path), hard_negative_captions=4, dataset="some/folder")
    with pytest.raises(ValueError, match="momentum queue"):
        PretrainArguments(output_dir=str(tmp_path), hard_negative_captions=4, queue_size=8)
