"""Fine-tuning with transformers' Trainer: collators, short runs of every task from a tiny pretrained folder (the saved
folder reloads and reproduces the reported metrics), the loss under gradient accumulation, and retrieval's global-batch
loss (two processes train like one with the combined batch)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file
from test_training_inference import solid
from transformers import TrainingArguments

from xmodal import (
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForVisualQuestionAnswering,
    XModalModel,
    XModalProcessor,
)
from xmodal.training.data import ANSWER_VOCAB, SHAPES
from xmodal.training.evaluation.evaluator import evaluate_model
from xmodal.training.losses import ContrastiveLoss
from xmodal.training.transfer.finetune import (
    ContrastiveTrainer,
    build_trainer,
    caption_length,
    captioning_metrics,
    compute_accuracy,
    finetune,
    generate_captions,
    summarize_metrics,
)
from xmodal.training.transfer.finetune_arguments import FinetuneArguments
from xmodal.training.transfer.finetune_data import (
    CaptioningCollator,
    ImageClassificationCollator,
    RetrievalCollator,
    VQACollator,
    load_finetune_data,
    vqa_score,
)

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))


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
    with pytest.raises(ValueError, match="--task must be one of image-classification, vqa, retrieval, captioning"):
        FinetuneArguments(task="segmentation")
    with pytest.raises(ValueError, match="--gradient_accumulation_steps must be at least 1"):
        FinetuneArguments(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="--lora_r must be 0 \\(off\\) or a positive rank, got -1"):
        FinetuneArguments(lora_r=-1)
    with pytest.raises(ValueError, match="--lora_dropout must be in \\[0, 1\\)"):
        FinetuneArguments(lora_dropout=1.0)
    with pytest.raises(ValueError, match="--max_new_tokens must be at least 1"):
        FinetuneArguments(task="captioning", max_new_tokens=0)
    assert FinetuneArguments(task="vqa").output_dir == "outputs/xmodal-vqa"
    assert FinetuneArguments(task="captioning").output_dir == "outputs/xmodal-captioning"


# ----------------------------------------------------------------------------------------------------------------
# Retrieval and captioning
# ----------------------------------------------------------------------------------------------------------------


def test_retrieval_collator_draws_one_caption_per_row(pretrained):
    processor = XModalProcessor.from_pretrained(pretrained)
    collator = RetrievalCollator(processor, max_length=12)
    captions = ["a red circle", "a blue square", "a green star"]
    rows = [{"image": solid("red"), "text": captions}, {"image": solid("blue"), "text": "a blue square"}]
    torch.manual_seed(0)
    drawn = set()
    for _ in range(30):
        batch = collator(rows)
        assert batch["return_loss"] is True and batch["pixel_values"].shape == (2, 3, 32, 32)
        assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 12
        texts = processor.batch_decode(batch["input_ids"], skip_special_tokens=True)
        assert texts[1] == "a blue square"
        drawn.add(texts[0])
    assert drawn == set(captions)
    with pytest.raises(ValueError, match="no caption"):
        collator([{"image": solid("red"), "text": []}])


def test_captioning_collator_labels_ignore_padding(pretrained):
    processor = XModalProcessor.from_pretrained(pretrained)
    tokenizer = processor.tokenizer
    collator = CaptioningCollator(processor, max_length=5, bos_token_id=tokenizer.cls_token_id)
    batch = collator(
        [{"image": solid("red"), "text": "a red"}, {"image": solid("blue"), "text": ["a blue square at the top"]}]
    )
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and ids.shape == labels.shape == mask.shape == (2, 5)
    assert ids[:, 0].tolist() == [tokenizer.cls_token_id] * 2
    # the short caption ([CLS] a red [SEP]) is right-padded and its padding ignored; the long one is truncated but
    # keeps its EOS
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert labels[0].tolist() == [*ids[0, :4].tolist(), -100] and labels[1].tolist() == ids[1].tolist()
    assert ids[0, 3].item() == ids[1, 4].item() == tokenizer.sep_token_id
    assert processor.decode(ids[0], skip_special_tokens=True) == "a red"
    with pytest.raises(ValueError, match="does not start captions with the decoder's BOS id 7"):
        CaptioningCollator(processor, bos_token_id=7)([{"image": solid("red"), "text": "a red circle"}])


def test_caption_tasks_read_image_paths_and_any_caption_column(pretrained, tmp_path):
    paths = []
    for colour in ("red", "blue", "green"):
        solid(colour).save(tmp_path / f"{colour}.png")
        paths.append(str(tmp_path / f"{colour}.png"))
    rows = {"path": paths, "caption": ["a red one", "a blue one", "a green one"], "other": [1, 2, 3]}
    DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(rows)}).save_to_disk(
        tmp_path / "pairs"
    )
    args = _args(
        pretrained,
        tmp_path,
        task="retrieval",
        dataset=str(tmp_path / "pairs"),
        image_column="path",
        caption_column="caption",
        eval_split="validation",
        max_eval_samples=2,
    )
    train, held_out, labels = load_finetune_data(args, 32)
    assert labels == [] and train.column_names == held_out.column_names == ["image", "text"]
    assert len(train) == 3 and len(held_out) == 2
    assert isinstance(train[1]["image"], Image.Image) and train[1]["image"].getpixel((0, 0)) == solid("blue").getpixel(
        (0, 0)
    )
    assert train[1]["text"] == "a blue one"
    with pytest.raises(ValueError, match="lack the columns \\['captions'\\].*--caption_column"):
        load_finetune_data(
            _args(
                pretrained,
                tmp_path,
                task="captioning",
                dataset=str(tmp_path / "pairs"),
                image_column="path",
                eval_split="validation",
            ),
            32,
        )


@pytest.mark.parametrize("task", ["retrieval", "captioning"])
def test_caption_task_run_learns_and_saves_a_folder_that_reproduces_its_metrics(pretrained, tmp_path, task):
    # retrieval on the one-caption `text` column (the same 4 pairs each step); captioning draws from `captions`; the
    # saved folder must give the reported held-out metrics again
    args = _args(
        pretrained,
        tmp_path,
        task=task,
        caption_column="text" if task == "retrieval" else "captions",
        max_train_samples=4,
        max_steps=4,
        learning_rate=2e-3,
        warmup_steps=0,
        lr_scheduler_type="constant",
    )
    metrics = finetune(args)
    losses = metrics["losses"]
    assert metrics["task"] == task and metrics["train_steps"] == 4 and len(losses) == 4
    assert all(math.isfinite(loss) for loss in losses), losses
    if task == "retrieval":
        # InfoNCE over 4 pairs; the random tiny model embeds every input alike (cosine ~1), so it starts at ln 4 and
        # four steps barely move it
        assert losses[0] == pytest.approx(math.log(4), abs=0.01)
    else:
        assert losses[-1] < losses[0] - 0.1, losses
    assert "num_labels" not in metrics and math.isfinite(metrics["eval_loss"])
    out = tmp_path / "finetuned"
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "modeling_xmodal.py"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["arguments"]["task"] == task and saved["eval_loss"] == metrics["eval_loss"]
    processor = XModalProcessor.from_pretrained(out)
    _, held_out, _ = load_finetune_data(args, 32)
    assert metrics["eval_rows"] == len(held_out) == 8
    if task == "retrieval":
        # a random model ranks the true pair at (N + 1) / 2 on average
        assert 1 / 8 <= metrics["eval_text_to_image_R@1"] <= 1 and metrics["eval_image_to_text_R@10"] == 1.0
        model = XModalModel.from_pretrained(out)
        base = XModalModel.from_pretrained(pretrained)
        assert not torch.equal(model.text_projection.weight, base.text_projection.weight)
        assert not torch.equal(model.logit_scale, base.logit_scale)
        # the contrastive loss does not use the fusion module: frozen, saved unchanged
        torch.testing.assert_close(model.cross_model.state_dict(), base.cross_model.state_dict(), rtol=0, atol=0)
        recomputed = evaluate_model(model, processor, held_out, batch_size=8, show_progress=False)
        assert {f"eval_{key}": value for key, value in recomputed.items()} == {
            key: value
            for key, value in metrics.items()
            if key.startswith(("eval_text", "eval_image", "eval_mean_recall"))
        }
    else:
        assert 0.0 <= metrics["eval_bleu4"] <= 1.0 and metrics["eval_cider"] >= 0.0
        model = XModalForConditionalGeneration.from_pretrained(out)
        assert caption_length(args, processor, model.config) == 24
        captions = generate_captions(model, processor, held_out, batch_size=3, max_new_tokens=23)
        references = held_out["text"]
        assert metrics["eval_examples"] == [[caption, refs[0]] for caption, refs in zip(captions[:3], references)]
        scores = captioning_metrics(captions, references)
        assert scores == {"bleu4": metrics["eval_bleu4"], "cider": metrics["eval_cider"]}
    assert summarize_metrics(task, metrics).startswith("Held-out")


def test_captioning_metrics_score_matching_captions_higher():
    references = [["a red circle at the top", "the red circle is at the top"], "a blue square on the left"]
    perfect = captioning_metrics(["a red circle at the top", "a blue square on the left"], references)
    wrong = captioning_metrics(["a green star", "a green star"], references)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["cider"] > wrong["cider"] >= 0.0
    assert wrong["bleu4"] == 0.0
    with pytest.raises(ValueError, match="Got 1 captions for 2 sets of references"):
        captioning_metrics(["a"], references)


def test_caption_length_is_capped_by_the_decoder(pretrained):
    processor = XModalProcessor.from_pretrained(pretrained)
    config = XModalModel.config_class.from_pretrained(pretrained)
    assert caption_length(FinetuneArguments(task="captioning", max_length=10), processor, config) == 10
    with pytest.raises(ValueError, match="exceeds the captioning decoder's max_position_embeddings \\(24\\)"):
        caption_length(FinetuneArguments(task="captioning", max_length=30), processor, config)


def test_contrastive_trainer_gathers_the_global_batch_with_several_processes(pretrained, tmp_path, monkeypatch):
    """One process: the model's own InfoNCE. A world size > 1 switches to `ContrastiveLoss` (gathered embeddings);
    without a process group it gathers the local batch only, so loss and gradients must be those of the model."""
    args = _args(pretrained, tmp_path, task="retrieval", caption_column="text")
    trainer = build_trainer(args)
    assert isinstance(trainer, ContrastiveTrainer) and trainer.global_loss is None
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(4)])

    def loss_and_gradients(trainer: ContrastiveTrainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {
            name: param.grad.clone() for name, param in trainer.model.named_parameters() if param.grad is not None
        }
        return loss.detach(), grads

    local_loss, local_grads = loss_and_gradients(trainer)
    assert local_loss.item() > 0 and "logit_scale" in local_grads
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    distributed = build_trainer(args)
    assert isinstance(distributed.global_loss, ContrastiveLoss)
    gathered_loss, gathered_grads = loss_and_gradients(distributed)
    torch.testing.assert_close(gathered_loss, local_loss)
    assert gathered_grads.keys() == local_grads.keys()
    for name, grad in local_grads.items():
        torch.testing.assert_close(gathered_grads[name], grad, msg=name)


_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from xmodal.training.transfer.finetune import FinetuneArguments, finetune
finetune(FinetuneArguments(**json.loads(sys.argv[1])))
"""


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate launcher is not installed next to this Python")
def test_two_processes_fine_tune_retrieval_like_one_process_with_the_combined_batch(pretrained, tmp_path):
    """`accelerate launch` with 2 CPU processes of 4 pairs vs one process of 8: the same losses (InfoNCE over 8 pairs,
    ln 8 at the start, not ln 4) and the same SGD updates, so `ContrastiveTrainer` gathers the global batch."""
    run = {
        "task": "retrieval",
        "model": pretrained,
        "caption_column": "text",
        "num_train_examples": 16,
        "num_eval_examples": 8,
        "max_steps": 2,
        "logging_steps": 1,
        "optim": "sgd",
        "learning_rate": 1.0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
    }
    single, double = tmp_path / "single", tmp_path / "double"
    ours = finetune(FinetuneArguments(**run, output_dir=str(single), batch_size=8, eval_batch_size=8))
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    arguments = json.dumps({**run, "output_dir": str(double), "batch_size": 4, "eval_batch_size": 4})
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script), arguments]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads((double / "metrics.json").read_text())
    assert theirs["losses"] == pytest.approx(ours["losses"], abs=1e-5)
    assert ours["losses"][0] == pytest.approx(math.log(8), abs=0.05)
    initial = load_file(os.path.join(pretrained, "model.safetensors"))
    ours_weights, theirs_weights = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    largest = max((ours_weights[name] - value).abs().max().item() for name, value in initial.items())
    assert largest > 1e-3
    for name, value in ours_weights.items():
        torch.testing.assert_close(theirs_weights[name], value, rtol=0, atol=1e-4 * largest, msg=name)
    # the evaluation is sharded over the two processes and gathered: the same figures
    for key in ("eval_loss", "eval_text_to_image_R@1", "eval_image_to_text_mean_rank"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-6), key


def test_summaries_name_each_task_metric():
    common = {"eval_rows": 8, "train_loss": 1.25, "train_steps": 7}
    assert summarize_metrics("vqa", {**common, "eval_accuracy": 0.5}).splitlines() == [
        "Held-out accuracy (vqa, 8 rows): 50.0%",
        "Mean training loss 1.250 over 7 steps",
    ]
    retrieval = {
        **common,
        **{f"eval_text_to_image_R@{k}": k / 10 for k in (1, 5, 10)},
        **{f"eval_image_to_text_R@{k}": k / 20 for k in (1, 5, 10)},
        "eval_text_to_image_mean_rank": 3.0,
    }
    assert summarize_metrics("retrieval", retrieval).splitlines()[0] == (
        "Held-out retrieval (8 pairs): text->image R@1 10.0%, R@5 50.0%, R@10 100.0%; "
        "image->text R@1 5.0%, R@5 25.0%, R@10 50.0%"
    )
    captioning = summarize_metrics("captioning", {**common, "eval_bleu4": 0.25, "eval_cider": 1.5})
    assert captioning.splitlines()[0] == "Held-out captioning (8 images, greedy): BLEU-4 0.250, CIDEr-D 1.500"
