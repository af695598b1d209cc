"""The training recipe: train-time augmentation (never at evaluation, seeded), loss balancing, the wall-clock budget
and its schedule, best-model selection, and the ITM evaluation's in-batch negatives."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from xmodal import XModalConfig
from xmodal.processing import train_tokenizer
from xmodal.training import (
    BudgetedSchedule,
    EvaluationTask,
    ImageTextCollator,
    LossBalancer,
    ModelSelection,
    PairAugmentation,
    PretrainArguments,
    build_processor,
    itm_metrics,
    mirror_left_right,
    parse_duration,
    pretrain,
    train_augmentation,
)
from xmodal.training.data import caption_corpus, make_synthetic_dataset
from xmodal.training.evaluation.evaluator import _EvalCollator, _in_batch_negatives
from xmodal.training.pretraining.checkpointing import list_checkpoints

SMALL_TOWERS = json.dumps(
    {
        "vision_config": {"image_size": 32, "patch_size": 16, "num_hidden_layers": 1},
        "text_config": {"num_hidden_layers": 1},
        "cross_config": {"num_hidden_layers": 1},
    }
)


@pytest.fixture(scope="module")
def scenes():
    data = make_synthetic_dataset(num_train=8, num_validation=0, num_test=0, seed=5, image_size=32)["train"]
    tokenizer = train_tokenizer(list(caption_corpus(data)), vocab_size=200, model_max_length=32)
    processor = build_processor(tokenizer, XModalConfig.from_preset("tiny", vision_config={"image_size": 32}))
    rows = [{**data[i], "_index": i} for i in range(8)]
    return processor, rows


def _plain_pixels(processor, rows):
    return processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]


def test_augmentation_is_applied_in_training_seeded_and_never_at_evaluation(tmp_path, scenes):
    processor, rows = scenes
    args = PretrainArguments(output_dir=str(tmp_path), color_jitter=0.2, grayscale_probability=0.2)
    augmentation = train_augmentation(args, processor)
    assert isinstance(augmentation, PairAugmentation)
    collator = ImageTextCollator(processor, 32, augmentation=augmentation)
    plain = _plain_pixels(processor, rows)
    torch.manual_seed(0)
    first = collator(rows)
    torch.manual_seed(0)
    again = collator(rows)
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(
        first["input_ids"], again["input_ids"]
    )
    changed = (first["pixel_values"] - plain).abs().flatten(1).amax(dim=1) > 1e-3
    assert changed.all(), changed  # every training image is cropped (and maybe flipped, jittered)
    torch.manual_seed(1)
    assert not torch.equal(collator(rows)["pixel_values"], first["pixel_values"])
    # evaluation sees the images exactly as the processor makes them, whatever the RNG
    evaluation = _EvalCollator(processor, 32, EvaluationTask())
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert torch.equal(evaluation(rows)["pixel_values"], plain)
    # --no_augment: the training images are the processor's too
    assert train_augmentation(PretrainArguments(output_dir=str(tmp_path), augment=False), processor) is None
    torch.manual_seed(0)
    assert torch.equal(ImageTextCollator(processor, 32)(rows)["pixel_values"], plain)


def test_a_flipped_pair_has_its_left_and_right_swapped(scenes):
    processor, rows = scenes
    assert mirror_left_right("a red circle on the left, to the right of a star") == (
        "a red circle on the right, to the left of a star"
    )
    assert mirror_left_right("the top left and the bottom right") == "the top right and the bottom left"
    images = _plain_pixels(processor, rows[:2])
    flips = torch.tensor([True, False])
    pair = PairAugmentation(horizontal_flip="mirror_text")
    assert torch.equal(pair.flip_images(images, flips)[0], images[0].flip(-1))
    assert torch.equal(pair.flip_images(images, flips)[1], images[1])
    assert pair.mirror_texts(["on the left", "on the left"], flips) == ["on the right", "on the left"]
    assert PairAugmentation(horizontal_flip="on").mirror_texts(["on the left"], flips[:1]) == ["on the left"]
    assert not PairAugmentation(horizontal_flip="off").draw_flips(64).any()
    with pytest.raises(ValueError, match="horizontal_flip must be one of"):
        PairAugmentation(horizontal_flip="sometimes")


def test_loss_balancing_math():
    losses = {"contrastive": torch.tensor(4.0), "vqa": torch.tensor(20.0)}
    weights = {"contrastive": 1.0, "vqa": 0.5}
    assert LossBalancer(weights, "none")(losses).item() == pytest.approx(4.0 + 10.0)
    # running_scale: each loss over its bias-corrected running mean, so each weighs its weight
    running = LossBalancer(weights, "running_scale", momentum=0.9)
    assert running(losses).item() == pytest.approx(1.0 + 0.5)
    halved = {"contrastive": torch.tensor(2.0), "vqa": torch.tensor(20.0)}
    mean = (0.9 * 0.1 * 4.0 + 0.1 * 2.0) / (1 - 0.9**2)  # bias-corrected EMA of 4 then 2
    assert running(halved).item() == pytest.approx(2.0 / mean + 0.5, rel=1e-5)
    assert running.effective_weights().tolist() == pytest.approx([1.0 / mean, 0.5 / 20.0], rel=1e-5)
    running.eval()  # evaluation does not move the statistics
    before = running.running_mean.clone()
    running(losses)
    assert torch.equal(running.running_mean, before)
    # relative_scale: the anchor (first objective) as it is, the others scaled to its running mean
    relative = LossBalancer(weights, "relative_scale", momentum=0.9)
    assert relative(losses).item() == pytest.approx(4.0 + 0.5 * 4.0)
    assert relative(halved).item() == pytest.approx(2.0 + 0.5 * 20.0 * mean / 20.0, rel=1e-5)
    assert relative.effective_weights().tolist() == pytest.approx([1.0, 0.5 * mean / 20.0], rel=1e-5)
    # before the anchor has a running mean, the others are scaled as running_scale does
    unanchored = LossBalancer(weights, "relative_scale", momentum=0.9)
    assert unanchored({"vqa": torch.tensor(20.0)}).item() == pytest.approx(0.5)
    # uncertainty (Kendall et al. 2018): exp(-s) L + s / 2, with s learned
    uncertainty = LossBalancer(weights, "uncertainty")
    total = uncertainty({name: value.requires_grad_() for name, value in losses.items()})
    assert total.item() == pytest.approx(4.0 + 10.0)
    total.backward()
    assert uncertainty.log_variance.grad.tolist() == pytest.approx([1.0 * (0.5 - 4.0), 0.5 * (0.5 - 20.0)])
    with pytest.raises(ValueError, match="--loss_balancing must be one of"):
        LossBalancer(weights, "magic")
    with pytest.raises(ValueError, match="expects the losses of"):
        LossBalancer(weights)({"itm": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="expects the losses of"):
        LossBalancer(weights)({})


@pytest.mark.parametrize("mode", ["none", "running_scale", "relative_scale", "uncertainty"])
def test_loss_balancing_of_a_step_that_skips_objectives(mode):
    """A contrastive-only step (`--auxiliary_every`) sums what it computed and moves only that objective's
    statistics; the skipped objective's running mean and count stay put."""
    weights = {"contrastive": 1.0, "vqa": 0.5}
    balancer = LossBalancer(weights, mode, momentum=0.9)
    balancer({"contrastive": torch.tensor(4.0), "vqa": torch.tensor(20.0)})
    before = {name: value.clone() for name, value in balancer.state_dict().items()}
    total = balancer({"contrastive": torch.tensor(2.0)})
    if mode == "none":
        assert total.item() == pytest.approx(2.0)
    elif mode == "running_scale":
        mean = (0.9 * 0.1 * 4.0 + 0.1 * 2.0) / (1 - 0.9**2)
        assert total.item() == pytest.approx(2.0 / mean, rel=1e-5)
        assert balancer.num_updates.tolist() == [2, 1]
        assert balancer.running_mean[1] == before["running_mean"][1]
        assert balancer.effective_weights()[1].item() == pytest.approx(0.5 / 20.0, rel=1e-5)
    elif mode == "relative_scale":
        assert total.item() == pytest.approx(2.0)
        assert balancer.num_updates.tolist() == [2, 1]
        assert balancer.running_mean[1] == before["running_mean"][1]
    else:
        assert total.item() == pytest.approx(2.0)
    # a checkpoint of an older balancer (one update count for all objectives) still loads
    if mode == "running_scale":
        old = {**balancer.state_dict(), "num_updates": torch.tensor(7)}
        balancer.load_state_dict(old)
        assert balancer.num_updates.tolist() == [7, 7]


@pytest.mark.parametrize(
    "value, seconds",
    [("90", 90.0), (45, 45.0), ("90s", 90.0), ("8m", 480.0), ("1h30m", 5400.0), ("08:00", 480.0),
     ("00:08:00", 480.0), ("00:00:08:00", 480.0), ("1d2h", 93600.0)],
)  # fmt: skip
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "8 minutes", "0", "-5", "1:2:3:4:5", "nan"])
def test_parse_duration_refuses_bad_budgets(value):
    with pytest.raises(ValueError, match="is not a positive duration; accepted"):
        parse_duration(value)


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_step_schedule_is_transformers_cosine_with_warmup():
    ours, theirs = _optimizer(), _optimizer()
    schedule = BudgetedSchedule(ours, warmup_steps=5, max_steps=40)
    reference = get_cosine_schedule_with_warmup(theirs, 5, 40)
    for step in range(1, 41):
        schedule.step(step, seconds=0.0)
        theirs.step()
        reference.step()
        assert schedule.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], abs=1e-9), step


def test_time_schedule_decays_over_the_budget():
    schedule = BudgetedSchedule(_optimizer(), warmup_steps=2, max_steps=None, max_seconds=100.0)
    schedule.step(1, 5.0)
    assert schedule.get_last_lr()[0] == pytest.approx(0.5)  # warmup counts steps
    schedule.step(2, 10.0)  # warmup ends at 10% of the budget: the cosine runs over the other 90%
    assert schedule.get_last_lr()[0] == pytest.approx(1.0)
    schedule.step(3, 55.0)
    assert schedule.get_last_lr()[0] == pytest.approx(0.5)
    schedule.step(4, 100.0)
    assert schedule.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    # whichever limit comes first ends the decay
    both = BudgetedSchedule(_optimizer(), warmup_steps=0, max_steps=10, max_seconds=1000.0)
    assert both.progress(5, 900.0) == pytest.approx(0.9) and both.progress(5, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs max_steps, max_seconds or both"):
        BudgetedSchedule(_optimizer(), 0, None, None)


def test_model_selection_keeps_the_best_evaluation():
    selection = ModelSelection(eval_steps=0.25, metric="eval_mean_recall")
    state = ModelSelection.initial_state()
    due = [step for step in range(1, 21) if selection.due(step, step / 20, state)]
    assert due == [5, 10, 15, 20]
    for step, value in zip(due, [0.1, 0.3, float("nan"), 0.2]):
        if selection.improves({"mean_recall": value}, state):
            state["best"] = selection.record(step, {"mean_recall": value})
    assert state["best"] == {"step": 10, "metric": "eval_mean_recall", "value": 0.3}
    lower = ModelSelection(eval_steps=3, metric="loss", greater_is_better=False)
    low_state = {"next_eval_progress": None, "best": {"step": 3, "metric": "loss", "value": 1.0}}
    assert lower.improves({"loss": 0.5}, low_state) and not lower.improves({"loss": 2.0}, low_state)
    assert [step for step in range(1, 10) if lower.due(step, 0.0, low_state)] == [3, 6, 9]
    with pytest.raises(ValueError, match="'recall' is not a metric of the evaluation; accepted: \\['mean_recall'\\]"):
        ModelSelection(1, "recall").improves({"mean_recall": 0.1, "note": "x"}, state)


def test_in_batch_negatives_are_never_the_positive():
    torch.manual_seed(0)
    input_ids = torch.tensor([[1, 5, 2], [1, 5, 2], [1, 6, 2], [1, 7, 2]])  # rows 0 and 1: the same caption
    embeds = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    # make each image's own text and its duplicate the most similar, so that a careless argmax would pick them
    text_embeds = embeds.clone()
    text_embeds[1] = embeds[0]
    random_index, hard_index, valid = _in_batch_negatives(input_ids, embeds, text_embeds)
    for image in range(4):
        own = input_ids[image]
        assert not torch.equal(input_ids[hard_index[image]], own), image
        if valid[0, image]:
            assert not torch.equal(input_ids[random_index[image]], own), image
    assert valid[1].all()
    assert valid[0].tolist() == [False, True, True, True]  # image 0's shifted text (row 1) is its own caption
    # a batch of one distinct caption has no valid negative
    _, _, none = _in_batch_negatives(input_ids[:2], embeds[:2], text_embeds[:2])
    assert not none.any()


def test_itm_metrics():
    # matched pairs score 2, 1, -1; random negatives -2, -3, NaN (missing); hard negatives 0.5, -0.5, -1
    log_odds = torch.tensor([[2.0, -2.0, 0.5], [1.0, -3.0, -0.5], [-1.0, float("nan"), -1.0]])
    metrics = itm_metrics(log_odds)
    assert metrics["itm_accuracy"] == pytest.approx(0.5 * (2 / 3 + 1.0))
    assert metrics["itm_hard_accuracy"] == pytest.approx(0.5 * (2 / 3 + 2 / 3))
    # 3 positives x 5 negatives: wins 5 + 4 + 1 (ties with -1 count half: 0.5 + 0.5 + ... )
    negatives = [-2.0, -3.0, 0.5, -0.5, -1.0]
    wins = sum((p > n) + 0.5 * (p == n) for p in (2.0, 1.0, -1.0) for n in negatives)
    assert metrics["itm_auc"] == pytest.approx(wins / 15)
    with pytest.raises(ValueError, match="needs \\(N, 3\\) log-odds"):
        itm_metrics(torch.zeros(4, 2))


def test_max_time_stops_within_one_step_saves_and_keeps_the_best_model(tmp_path):
    """A 12-second budget: the run stops before the next step would pass it, saves a checkpoint and the model, and
    the saved weights are those of the best validation (mean recall)."""
    args = PretrainArguments(
        output_dir=str(tmp_path / "run"),
        num_train_examples=256,
        num_eval_examples=32,
        num_validation_examples=32,
        eval_batch_size=32,
        vocab_size=256,
        batch_size=16,
        warmup_steps=2,
        max_time="12s",
        eval_steps=0.25,
        load_best_model_at_end=True,
        config_overrides=SMALL_TOWERS,
    )
    metrics = pretrain(args)
    steps, seconds = metrics["train_steps"], metrics["train_seconds"]
    assert steps > 4
    step_time = seconds / steps
    assert seconds <= 12.0 + step_time and seconds > 12.0 - 3 * step_time, (seconds, step_time)
    out = tmp_path / "run"
    assert [os.path.basename(path) for path in list_checkpoints(str(out))] == [f"step-{steps:06d}"]
    history = metrics["eval_history"]
    assert len(history) >= 4 and history[-1]["step"] == steps
    best = max(history, key=lambda record: record["mean_recall"])  # the first of equal values, as selection keeps
    assert metrics["best_model"]["step"] == best["step"] == metrics["saved_model_step"]
    saved = load_file(out / "model.safetensors")
    kept = load_file(out / "checkpoints" / "best" / "model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[name], kept[name]) for name in saved)
    assert all(math.isfinite(value) for value in metrics["losses"])


def test_auxiliary_every_computes_the_other_objectives_on_one_step_in_n(tmp_path):
    """`--auxiliary_every 3`: steps 1, 4, 7 compute every objective, the others contrastive alone; the curves hold
    None where an objective was skipped, and the model card still plots them."""
    args = PretrainArguments(
        output_dir=str(tmp_path / "run"),
        num_train_examples=128,
        num_eval_examples=32,
        eval_batch_size=32,
        vocab_size=256,
        batch_size=8,
        max_steps=7,
        warmup_steps=1,
        objectives="contrastive,itm,mim",
        loss_balancing="running_scale",
        auxiliary_every=3,
        config_overrides=SMALL_TOWERS,
    )
    metrics = pretrain(args)
    curves = metrics["objective_losses"]
    assert all(math.isfinite(value) for value in curves["contrastive"]) and len(curves["contrastive"]) == 7
    for name in ("itm", "mim"):
        assert [value is not None for value in curves[name]] == [True, False, False, True, False, False, True], name
        assert all(math.isfinite(value) for value in curves[name] if value is not None)
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    for objectives, every, message in [
        ("contrastive", 2, "must include contrastive and at least one more"),
        ("itm,mim", 2, "must include contrastive and at least one more"),
        ("all", 0, "--auxiliary_every must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            PretrainArguments(output_dir=str(tmp_path / "bad"), objectives=objectives, auxiliary_every=every)
    for start, message in [(1.0, r"must be in \[0, 1\)"), (0.5, "must include contrastive and at least one more")]:
        with pytest.raises(ValueError, match=message):
            PretrainArguments(output_dir=str(tmp_path / "bad"), objectives="itm", auxiliary_start=start)


def test_auxiliary_start_trains_the_contrastive_loss_alone_first(tmp_path):
    """`--auxiliary_start 0.5` of 6 steps: steps 1-3 contrastive alone, then every objective."""
    args = PretrainArguments(
        output_dir=str(tmp_path / "run"),
        num_train_examples=64,
        num_eval_examples=16,
        eval_batch_size=16,
        vocab_size=256,
        batch_size=8,
        max_steps=6,
        warmup_steps=1,
        objectives="contrastive,mim",
        auxiliary_start=0.5,
        config_overrides=SMALL_TOWERS,
    )
    curve = pretrain(args)["objective_losses"]["mim"]
    assert [value is not None for value in curve] == [False, False, False, True, True, True]


@pytest.mark.slow
def test_demo_recipe_at_reduced_size_beats_chance_by_far(tmp_path):
    """The demo's recipe (width 128, CLIP-style towers, 48 px scenes with one 16 px patch per grid cell,
    augmentation, every objective with the extra ones on a quarter of each batch on one step in four after the first
    30%, relative-scale balancing) on 2,000 scenes for 150 steps: held-out retrieval far above chance."""
    width = {"hidden_size": 128, "intermediate_size": 512}
    args = PretrainArguments(
        output_dir=str(tmp_path / "run"),
        num_train_examples=2000,
        num_eval_examples=200,
        eval_batch_size=100,
        batch_size=32,
        max_steps=150,
        objectives="all",
        tower_style="clip",
        auxiliary_batch_size=8,
        auxiliary_every=4,
        auxiliary_start=0.3,
        loss_balancing="relative_scale",
        loss_weights="itm=0.1,mlm=0.1,mim=0.1,captioning=0.25,vqa=0.5",
        config_overrides=json.dumps(
            {
                "projection_dim": 128,
                "vision_config": {"image_size": 48, "patch_size": 16, **width},
                "text_config": width,
                "cross_config": width,
            }
        ),
    )
    metrics = pretrain(args)
    chance_r10 = 10 / 200
    assert metrics["test_text_to_image_R@10"] > 4 * chance_r10, metrics["test_text_to_image_R@10"]
    assert metrics["test_image_to_text_R@10"] > 4 * chance_r10, metrics["test_image_to_text_R@10"]
