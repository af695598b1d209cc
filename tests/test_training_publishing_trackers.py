"""`--report_to`: tracker names checked before a run (unknown and not-installed trackers are errors, not silence), and
TensorBoard logs written offline by pretraining (Accelerate's tracker) and fine-tuning (the Trainer's integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.utils import LoggerType
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import xmodal.training.publishing.trackers as trackers
from xmodal.training import PretrainArguments, pretrain
from xmodal.training.publishing.trackers import parse_report_to
from xmodal.training.transfer.finetune import finetune
from xmodal.training.transfer.finetune_arguments import FinetuneArguments


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under `folder`: tag -> [(step, value)]."""
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {folder}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in files:
        events = EventAccumulator(str(file))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in events.Scalars(tag))
    return scalars


def test_report_to_names() -> None:
    assert parse_report_to("none") == []
    assert parse_report_to("tensorboard") == ["tensorboard"]
    assert parse_report_to(" tensorboard , tensorboard ") == ["tensorboard"]
    assert "tensorboard" in parse_report_to("all")


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("tensorbord", r"tensorbord is not a tracker; accepted: none, all, or comma-separated names among aim, "),
        ("none,tensorboard", r"none is not a tracker \(none and all stand alone\)"),
        ("", r"--report_to is empty"),
    ],
)
def test_bad_report_to_names_are_refused(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_report_to(value)


def test_a_tracker_that_is_not_installed_is_an_error_with_the_install_command(monkeypatch) -> None:
    # Accelerate alone would skip it with a debug message and log nothing for the whole run
    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    with pytest.raises(ValueError, match=r"wandb is not installed \(pip install wandb\); installed trackers: tensorb"):
        parse_report_to("tensorboard,wandb")
    with pytest.raises(ValueError, match=r"--report_to 'wandb': wandb is not installed"):
        PretrainArguments(report_to="wandb")
    with pytest.raises(ValueError, match=r"--report_to 'wandb': wandb is not installed"):
        FinetuneArguments(report_to="wandb")


def test_pretraining_logs_every_step_to_tensorboard(tmp_path) -> None:
    output = tmp_path / "run"
    metrics = pretrain(
        PretrainArguments(
            output_dir=str(output),
            num_train_examples=32,
            num_eval_examples=16,
            eval_batch_size=16,
            vocab_size=128,
            batch_size=8,
            max_steps=4,
            warmup_steps=1,
            eval_steps=2,
            logging_steps=1,
            report_to="tensorboard",
        )
    )
    scalars = _scalars(output)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["loss"]] == pytest.approx(metrics["losses"], rel=1e-6)
    assert [step for step, _ in scalars["lr"]] == [1, 2, 3, 4]
    # the periodic validation is logged at its steps
    assert [step for step, _ in scalars["eval_text_to_image_R@1"]] == [2, 4]
    assert json.loads((output / "metrics.json").read_text())["losses"] == metrics["losses"]


def test_finetuning_logs_to_tensorboard(pretrained: str, tmp_path) -> None:
    output = tmp_path / "finetuned"
    args = FinetuneArguments(
        model=pretrained,
        output_dir=str(output),
        task="image-classification",
        num_train_examples=16,
        num_eval_examples=8,
        max_steps=3,
        batch_size=4,
        eval_batch_size=8,
        logging_steps=1,
        report_to="tensorboard",
    )
    finetune(args)
    scalars = _scalars(output)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
