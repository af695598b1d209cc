"""Fine-tuning with transformers' Trainer: collators, short runs of both tasks from a tiny pretrained folder, and the
loss under gradient accumulation."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from test_training_inference import save_tiny_model, solid

from xmodal import XModalForImageClassification, XModalForVisualQuestionAnswering, XModalProcessor
from xmodal.training.data import ANSWER_VOCAB, SHAPES
from xmodal.training.finetune import (
    FinetuneArguments,
    ImageClassificationCollator,
    VQACollator,
    build_trainer,
    compute_accuracy,
    finetune,
    vqa_score,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("pretrained")
    save_tiny_model(folder)
    return str(folder)


def _args(pretrained: str, tmp_path, **overrides: object) -> FinetuneArguments:
    values: dict[str, object] = {
        "model": pretrained,
        "output_dir": str(tmp_path / "finetuned"),
        "num_train_examples": 16,
        "num_eval_examples": 8,
        "max_steps": 3,
        "batch_size": 4,
        "eval_batch_size": 8,
        "logging_steps": 1,
    }
    return FinetuneArguments(**{**values, **overrides})


def test_vqa_scores_follow_the_vqa_v2_evaluation():
    assert [round(vqa_score(matches, 10), 6) for matches in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert vqa_score(1, 1) == 1.0 and vqa_score(0, 1) == 0.0


def test_classification_collator(pretrained):
    processor = XModalProcessor.from_pretrained(pretrained)
    collator = ImageClassificationCollator(processor, label2id={name: i for i, name in enumerate(SHAPES)})
    batch = collator([{"image": solid("red"), "label": 2}, {"image": Image.new("L", (40, 20)), "label": "star"}])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [2, SHAPES.index("star")]
    with pytest.raises(ValueError, match="Unknown class name 'hexagon'"):
        collator([{"image": solid("red"), "label": "hexagon"}])
    with pytest.raises(ValueError, match="out of range"):
        collator([{"image": solid("red"), "label": 6}])


def test_vqa_collator_gives_indices_or_soft_scores(pretrained):
    processor = XModalProcessor.from_pretrained(pretrained)
    vocab = ["yes", "no", "red", "2"]
    collator = VQACollator(processor, vocab, max_length=12)
    rows = [
        {"image": solid("red"), "question": "what colour is the circle?", "answers": "red"},
        {"image": solid("blue"), "question": "is there a square?", "answers": 1},
    ]
    batch = collator(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 12
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].tolist() == [2, 1]
    rows.append({"image": solid("green"), "question": "how many?", "answers": ["2"] * 3 + ["two"] * 6 + ["no"]})
    rows.append({"image": solid("green"), "question": "is it?", "answers": {"yes": 0.6, "maybe": 1.0}})
    soft = collator(rows)["labels"]
    expected = torch.tensor(
        [[0, 0, 1, 0], [0, 1, 0, 0], [0, vqa_score(1, 10), 0, vqa_score(3, 10)], [0.6, 0, 0, 0]], dtype=torch.float
    )
    torch.testing.assert_close(soft, expected)
    with pytest.raises(ValueError, match="'maybe' is not in the answer vocabulary"):
        collator([{"image": solid("red"), "question": "?", "answers": "maybe"}])


def test_accuracy_of_indices_and_of_soft_scores():
    from transformers import EvalPrediction

    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]).numpy()
    assert compute_accuracy(EvalPrediction(logits, torch.tensor([1, 1, 1]).numpy())) == {
        "accuracy": pytest.approx(2 / 3)
    }
    soft = torch.tensor([[0.0, 0.9], [0.3, 1.0], [0.0, 0.6]]).numpy()
    assert compute_accuracy(EvalPrediction(logits, soft)) == {"accuracy": pytest.approx((0.9 + 0.3 + 0.6) / 3)}


@pytest.mark.parametrize(
    ("task", "model_class", "labels"),
    [
        ("image-classification", XModalForImageClassification, list(SHAPES)),
        ("vqa", XModalForVisualQuestionAnswering, list(ANSWER_VOCAB)),
    ],
)
def test_short_finetuning_run_saves_a_reloadable_folder(pretrained, tmp_path, task, model_class, labels):
    args = _args(pretrained, tmp_path, task=task)
    metrics = finetune(args)
    assert metrics["task"] == task and metrics["num_labels"] == len(labels) and metrics["train_steps"] == 3
    assert len(metrics["losses"]) == 3 and all(loss == loss for loss in metrics["losses"])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    # VQA trains on every question of a scene: more rows than scenes
    assert metrics["train_rows"] == 16 if task == "image-classification" else metrics["train_rows"] > 16
    out = tmp_path / "finetuned"
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "modeling_xmodal.py"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["arguments"]["task"] == task and saved["eval_accuracy"] == metrics["eval_accuracy"]
    model = model_class.from_pretrained(out)
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    assert model.config.label2id[labels[-1]] == len(labels) - 1
    tokenizer = XModalProcessor.from_pretrained(out).tokenizer
    assert tokenizer.unk_token_id not in tokenizer("a red circle")["input_ids"]


def test_head_is_new_and_towers_are_pretrained(pretrained, tmp_path):
    from xmodal import XModalModel

    base = XModalModel.from_pretrained(pretrained)
    model = build_trainer(_args(pretrained, tmp_path, task="vqa")).model
    torch.testing.assert_close(model.vision_model.state_dict(), base.vision_model.state_dict())
    torch.testing.assert_close(model.cross_model.state_dict(), base.cross_model.state_dict())
    assert model.vqa_head.classifier.weight.shape == (len(ANSWER_VOCAB), 64)


def _one_step(pretrained, tmp_path, task: str, batch_size: int, accumulation: int, scaled_for_ga: bool | None = None):
    """Loss logged at the first optimizer step and each parameter's update, SGD at lr 1 on 8 rows."""
    args = _args(
        pretrained,
        tmp_path,
        task=task,
        max_train_samples=8,
        max_steps=1,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    trainer = build_trainer(args)
    trainer.loss_is_scaled_for_ga = scaled_for_ga
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    updates = {name: param.detach() - before[name] for name, param in trainer.model.named_parameters()}
    return trainer.state.log_history[0]["loss"], updates


@pytest.mark.parametrize("task", ["image-classification", "vqa"])
def test_gradient_accumulation_gives_the_loss_and_update_of_the_full_batch(pretrained, tmp_path, task):
    """8 rows in one batch vs 2 x 4 accumulated: the same logged loss and the same SGD update. This holds because the
    xmodal heads set `accepts_loss_kwargs = False` (their loss is a batch mean and their forward takes no
    `num_items_in_batch`), so Trainer divides each micro-batch loss by the number of accumulation steps."""
    assert XModalForImageClassification.accepts_loss_kwargs is False
    assert XModalForVisualQuestionAnswering.accepts_loss_kwargs is False
    full_loss, full_updates = _one_step(pretrained, tmp_path, task, batch_size=8, accumulation=1)
    accumulated_loss, accumulated_updates = _one_step(pretrained, tmp_path, task, batch_size=4, accumulation=2)
    assert accumulated_loss == pytest.approx(full_loss, rel=1e-5)
    largest = max(update.abs().max().item() for update in full_updates.values())
    assert largest > 1e-2
    for name, update in full_updates.items():
        torch.testing.assert_close(accumulated_updates[name], update, atol=1e-5 * largest, rtol=1e-4, msg=name)
    if task == "image-classification":
        # the check is sharp: a Trainer that took the loss as already scaled would take a twice larger step
        _, doubled = _one_step(pretrained, tmp_path, task, batch_size=4, accumulation=2, scaled_for_ga=True)
        torch.testing.assert_close(
            doubled["classifier.weight"], 2 * full_updates["classifier.weight"], rtol=1e-4, atol=1e-6
        )


def test_finetuning_on_a_saved_dataset_with_named_classes(pretrained, tmp_path):
    features = Features({"picture": ImageFeature(), "kind": Value("string")})
    rows = {"picture": [solid(colour) for colour in ("red", "blue") * 4], "kind": ["warm", "cold"] * 4}
    DatasetDict(
        {"train": Dataset.from_dict(rows, features=features), "validation": Dataset.from_dict(rows, features=features)}
    ).save_to_disk(tmp_path / "colours")
    args = _args(
        pretrained,
        tmp_path,
        dataset=str(tmp_path / "colours"),
        image_column="picture",
        label_column="kind",
        eval_split="validation",
        max_steps=2,
    )
    metrics = finetune(args)
    assert metrics["num_labels"] == 2 and metrics["eval_rows"] == 8
    config = XModalForImageClassification.config_class.from_pretrained(tmp_path / "finetuned")
    assert config.id2label == {0: "cold", 1: "warm"}
    with pytest.raises(ValueError, match="no split 'test'; its splits: train, validation"):
        build_trainer(_args(pretrained, tmp_path, dataset=str(tmp_path / "colours")))
    with pytest.raises(ValueError, match="lack the columns \\['image', 'label'\\]"):
        build_trainer(_args(pretrained, tmp_path, dataset=str(tmp_path / "colours"), eval_split="validation"))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="--task must be one of image-classification, vqa"):
        FinetuneArguments(task="captioning")
    with pytest.raises(ValueError, match="--gradient_accumulation_steps must be at least 1"):
        FinetuneArguments(gradient_accumulation_steps=0)
    assert FinetuneArguments(task="vqa").output_dir == "outputs/xmodal-vqa"
