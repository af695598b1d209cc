"""Pretraining on data sources other than the embedded scenes, bad rows skipped and counted, `xmodal evaluate`
computing every metric a multi-task model supports, and the loop's options (locked towers, gradient checkpointing,
accumulation, torch.compile)."""

from __future__ import annotations

import json
import logging
import os

import pytest
from PIL import Image

from xmodal.training import PretrainArguments, pretrain
from xmodal.training.cli import main

TINY = json.dumps(
    {
        "vision_config": {"num_hidden_layers": 1, "image_size": 32},
        "text_config": {"num_hidden_layers": 1},
        "cross_config": {"num_hidden_layers": 1},
    }
)
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _imagefolder(root, num_rows: int, corrupt: int = 0) -> str:
    """An imagefolder of solid-colour squares captioned with their colour, `corrupt` of them undecodable."""
    root.mkdir()
    rows = []
    names = list(COLORS)
    for index in range(num_rows):
        name = names[index % len(names)]
        file_name = f"{index:03d}.png"
        if index < corrupt:
            (root / file_name).write_bytes(b"not a png")
        else:
            Image.new("RGB", (24, 24), COLORS[name]).save(root / file_name)
        split = "test" if index >= num_rows - 8 else "train"
        rows.append({"file_name": file_name, "caption": f"a {name} square", "colour": name, "split": split})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return str(root)


def _args(tmp_path, **overrides) -> PretrainArguments:
    values = {
        "output_dir": str(tmp_path / "run"),
        "config_overrides": TINY,
        "vocab_size": 64,
        "batch_size": 8,
        "max_steps": 4,
        "warmup_steps": 1,
        "num_eval_examples": 8,
        "eval_batch_size": 8,
    }
    return PretrainArguments(**{**values, **overrides})


def test_imagefolder_with_split_column_zero_shot_labels_and_bad_rows_counted(tmp_path):
    folder = _imagefolder(tmp_path / "data", 48, corrupt=2)
    args = _args(
        tmp_path,
        dataset=folder,
        text_column="caption",
        split_column="split",
        zero_shot_label_column="colour",
        zero_shot_templates="a {} square",
        max_bad_row_fraction=0.5,
    )
    metrics = pretrain(args)
    assert metrics["bad_rows"] == 2 and metrics["rows_seen"] >= 32
    assert any("000.png" in example or "001.png" in example for example in metrics["bad_row_examples"])
    assert metrics["test_chance_R@1"] == pytest.approx(1 / 8)
    assert 0 <= metrics["test_zero_shot_top1"] <= metrics["test_zero_shot_top5"] == 1.0  # 4 classes
    card = open(os.path.join(args.output_dir, "README.md")).read()
    assert "Zero-shot top-1 accuracy" in card and "type: local" in card and folder not in card


def test_too_many_bad_rows_stop_the_run_naming_them(tmp_path):
    folder = _imagefolder(tmp_path / "data", 40, corrupt=20)
    args = _args(tmp_path, dataset=folder, text_column="caption", split_column="split", max_bad_row_fraction=0.0)
    with pytest.raises(RuntimeError, match=r"could not be decoded.*max_bad_row_fraction"):
        pretrain(args)


def test_streaming_source_trains(tmp_path):
    folder = _imagefolder(tmp_path / "data", 40)
    metrics = pretrain(
        _args(tmp_path, dataset=folder, text_column="caption", split_column="split", streaming=True, max_steps=6)
    )
    assert metrics["train_steps"] == 6 and metrics["bad_rows"] == 0


def test_evaluate_command_reports_every_metric_of_a_multitask_model(tmp_path, capsys):
    args = _args(tmp_path, objectives="all", num_train_examples=32, num_eval_examples=16, eval_batch_size=16)
    metrics = pretrain(args)
    for key in ("test_text_to_image_R@1", "test_zero_shot_top5", "test_vqa_accuracy", "test_captioning_cider"):
        assert key in metrics, key
    out_file = tmp_path / "eval.json"
    code = main(
        ["evaluate", "--model", args.output_dir, "--num_eval_examples", "16", "--batch_size", "16"]
        + ["--output_file", str(out_file)]
    )
    assert code == 0
    evaluated = json.loads(out_file.read_text())
    # the same model on the same test scenes: the figures of the run itself
    for key in ("text_to_image_R@1", "image_to_text_mean_rank", "zero_shot_top1", "vqa_accuracy", "captioning_bleu4"):
        assert evaluated[key] == pytest.approx(metrics[f"test_{key}"], abs=1e-6), key
    assert '"vqa_accuracy"' in capsys.readouterr().out


def test_real_emoji_data_pretrains_with_its_split_column(shared_data, tmp_path):
    args = _args(
        tmp_path,
        dataset=str(shared_data / "emoji-google"),
        text_column="name",
        split_column="emoji_split",
        zero_shot_label_column="category",
        zero_shot_templates="{}",
        num_eval_examples=64,
        eval_batch_size=64,
    )
    metrics = pretrain(args)
    assert metrics["bad_rows"] == 0 and metrics["test_chance_R@1"] == pytest.approx(1 / 64)
    assert 0 <= metrics["test_zero_shot_top1"] <= 1


def test_locked_image_tower_and_gradient_checkpointing_and_accumulation(tmp_path):
    from safetensors.torch import load_file

    args = _args(
        tmp_path,
        lock_image_tower=True,
        gradient_checkpointing=True,
        gradient_accumulation_steps=2,
        num_train_examples=64,
        save_steps=1,
        save_total_limit=0,
    )
    metrics = pretrain(args)
    assert metrics["train_pairs"] == 4 * 2 * 8 and all(loss == loss for loss in metrics["losses"])
    first = load_file(os.path.join(args.output_dir, "checkpoints", "step-000001", "model.safetensors"))
    last = load_file(os.path.join(args.output_dir, "model.safetensors"))
    vision = [name for name in last if name.startswith("vision_model.")]
    text = [name for name in last if name.startswith("text_model.encoder.")]
    assert vision and all((first[name] == last[name]).all() for name in vision)
    assert any((first[name] != last[name]).any() for name in text)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    eager_args = _args(tmp_path / "eager", max_steps=2, save_steps=2)
    eager = pretrain(eager_args)
    # the same tokenizer (WordPiece training is not reproducible across processes)
    tokenizer = os.path.join(eager_args.output_dir, "checkpoints", "tokenizer")
    compiled = pretrain(_args(tmp_path / "compiled", max_steps=2, torch_compile=True, tokenizer=tokenizer))
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)


def test_torch_compile_warns_on_cpu_that_eager_is_faster(tmp_path, caplog):
    from xmodal.training.pretraining.builders import build_accelerator

    with caplog.at_level(logging.WARNING, logger="xmodal.training.pretraining.builders"):
        build_accelerator(PretrainArguments(output_dir=str(tmp_path / "eager")))
        assert "torch_compile" not in caplog.text
        accelerator = build_accelerator(PretrainArguments(output_dir=str(tmp_path / "compiled"), torch_compile=True))
    assert accelerator.device.type == "cpu"
    assert "--torch_compile on CPU" in caplog.text and "train eager on CPU" in caplog.text
