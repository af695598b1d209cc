"""Parameter-efficient fine-tuning with peft: LoRA adapters on the attention projections of the xmodal heads train
alone (every base weight stays as it was), save as a small adapter, and reload on a freshly loaded base to reproduce
the outputs exactly; the fine-tuning recipes train LoRA adapters with --lora_r.

Skipped when peft is not installed, except under CI=true, where its absence is an error."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_training_inference import solid
from test_training_transfer_finetune import _args as finetune_args

from xmodal import (
    XModalConfig,
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForVisualQuestionAnswering,
    XModalModel,
    XModalProcessor,
)
from xmodal.training.data import SHAPES
from xmodal.training.transfer.finetune import apply_lora, build_trainer, finetune, lora_target_modules
from xmodal.training.transfer.finetune_arguments import ADAPTER_FOLDER, FinetuneArguments
from xmodal.training.transfer.finetune_data import ATTENTION_PROJECTIONS

# peft reads a property transformers 5 deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

if os.environ.get("CI") == "true":
    import peft  # CI installs the `peft` extra: its absence must fail the run, not skip it
else:
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'xmodal[peft]')")


def _attention_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__ == "XModalAttention"]


def test_lora_targets_are_every_attention_projection(pretrained):
    model = XModalModel.from_pretrained(pretrained)
    targets = lora_target_modules(model)
    attention = _attention_modules(model)
    assert attention and all(isinstance(model.get_submodule(name), torch.nn.Linear) for name in targets)
    # self-attention: fused qkv_proj + out_proj; cross-attention: q_proj + kv_proj + out_proj
    expected = [
        f"{name}.{projection}"
        for name in attention
        for projection in ATTENTION_PROJECTIONS
        if hasattr(model.get_submodule(name), projection)
    ]
    assert sorted(targets) == sorted(expected)
    assert {name.rsplit(".", 1)[-1] for name in targets} == set(ATTENTION_PROJECTIONS)
    towers_only = lora_target_modules(model, exclude=["cross_model"])
    assert towers_only == [name for name in targets if not name.startswith("cross_model.")]
    assert any(name.startswith("cross_model.") for name in targets) and towers_only
    assert lora_target_modules(XModalForImageClassification.from_pretrained(pretrained, num_labels=3)) == [
        "vision_model.encoder.layers.0.self_attn.qkv_proj",
        "vision_model.encoder.layers.0.self_attn.out_proj",
    ]


def _classification_inputs() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Training inputs (with the loss) and evaluation inputs of a fixed batch."""
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixel_values, "labels": torch.tensor([0, 1, 2, 0])}, {"pixel_values": pixel_values}


def _contrastive_inputs(pretrained: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Training inputs (with the loss) and evaluation inputs of four image-caption pairs."""
    processor = XModalProcessor.from_pretrained(pretrained)
    inputs = dict(
        processor(
            images=[solid(colour) for colour in ("red", "blue", "green", "yellow")],
            text=["a red circle", "a blue square", "a green star", "a yellow triangle"],
            padding=True,
            return_tensors="pt",
        )
    )
    return {**inputs, "return_loss": True}, inputs


HEADS = {
    # head, options of from_pretrained, new modules trained in full, modules left without adapters (the contrastive
    # loss does not use the fusion module), the output compared after reloading
    "classification": (XModalForImageClassification, {"num_labels": 3}, ["classifier"], [], "logits"),
    "base_model": (XModalModel, {}, [], ["cross_model"], "logits_per_text"),
}


@pytest.mark.parametrize("head", list(HEADS))
def test_lora_adapter_trains_alone_saves_and_reloads_to_the_same_outputs(pretrained, tmp_path, head):
    model_class, options, new_modules, exclude, output = HEADS[head]
    train_inputs, eval_inputs = (
        _classification_inputs() if head == "classification" else _contrastive_inputs(pretrained)
    )
    torch.manual_seed(0)
    base = model_class.from_pretrained(pretrained, **options)
    model = apply_lora(base, r=4, modules_to_save=new_modules, exclude=exclude)
    assert isinstance(model, peft.PeftModel)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable)
    assert any(".modules_to_save." in name for name in trainable) == bool(new_modules)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}

    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**train_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if name in trainable:
            # LoRA's A starts random and B at zero: both move; so does the new head
            assert changed or ".lora_A." in name, name
        else:
            assert not changed, f"the base weight {name} changed"
    assert any(".lora_B." in name and not torch.equal(param, before[name]) for name, param in model.named_parameters())

    model.eval()
    with torch.no_grad():
        expected = getattr(model(**eval_inputs), output)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["modules_to_save"] == (new_modules or None)
    assert sorted(config["target_modules"]) == sorted(
        lora_target_modules(model_class.from_pretrained(pretrained, **options), exclude=exclude)
    )
    full_size = os.path.getsize(os.path.join(pretrained, "model.safetensors"))
    assert os.path.getsize(adapter / "adapter_model.safetensors") < full_size / 3

    torch.manual_seed(1)  # a fresh base: a new head initialised differently, which the adapter replaces
    fresh = model_class.from_pretrained(pretrained, **options)
    if new_modules:
        assert not torch.equal(fresh.classifier.weight, model.get_base_model().classifier.weight)
    reloaded = peft.PeftModel.from_pretrained(fresh, adapter).eval()
    with torch.no_grad():
        assert torch.equal(getattr(reloaded(**eval_inputs), output), expected)


def _args(pretrained: str, tmp_path, **overrides: object) -> FinetuneArguments:
    """The fine-tuning tests' tiny run, with LoRA (rank 4) and a learning rate that suits adapters."""
    return finetune_args(pretrained, tmp_path, **{"lora_r": 4, "learning_rate": 1e-3, **overrides})


def test_classification_recipe_with_lora_saves_the_adapter_and_the_merged_model(pretrained, tmp_path):
    metrics = finetune(_args(pretrained, tmp_path, task="image-classification"))
    out = tmp_path / "finetuned"
    base = XModalForImageClassification.from_pretrained(pretrained, num_labels=len(SHAPES))
    assert 0 < metrics["trainable_parameters"] < sum(param.numel() for param in base.parameters()) / 2
    assert json.loads((out / "metrics.json").read_text())["trainable_parameters"] == metrics["trainable_parameters"]
    assert (out / ADAPTER_FOLDER / "adapter_config.json").is_file()
    merged = XModalForImageClassification.from_pretrained(out).eval()
    # only the attention projections (LoRA, merged) and the new classifier differ from the pretrained weights
    changed = {
        name
        for name, value in merged.state_dict().items()
        if name in base.state_dict() and not torch.equal(value, base.state_dict()[name])
    }
    assert changed and all(name.startswith("classifier.") or ".self_attn." in name for name in changed), changed
    assert {"classifier.weight", "vision_model.encoder.layers.0.self_attn.qkv_proj.weight"} <= changed
    # the adapter on a fresh base gives the outputs of the merged folder
    adapted = peft.PeftModel.from_pretrained(base, out / ADAPTER_FOLDER).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixel_values).logits, adapted(pixel_values=pixel_values).logits)


def test_recipes_put_lora_on_the_parts_each_task_uses(pretrained, tmp_path):
    retrieval = build_trainer(_args(pretrained, tmp_path, task="retrieval")).model
    targets = set(retrieval.peft_config["default"].target_modules)
    assert targets and not any(name.startswith("cross_model.") for name in targets)
    assert any(name.startswith("text_model.") for name in targets)
    assert not retrieval.peft_config["default"].modules_to_save
    vqa = build_trainer(_args(pretrained, tmp_path, task="vqa")).model
    assert isinstance(vqa.get_base_model(), XModalForVisualQuestionAnswering)
    assert any(name.startswith("cross_model.") for name in vqa.peft_config["default"].target_modules)
    assert vqa.peft_config["default"].modules_to_save == ["vqa_head"]
    # a checkpoint whose classifier already has the right shape: the task head still trains in full
    classifier = tmp_path / "classifier"
    XModalForImageClassification.from_pretrained(pretrained, num_labels=len(SHAPES)).save_pretrained(classifier)
    XModalProcessor.from_pretrained(pretrained).save_pretrained(classifier)
    reused = build_trainer(_args(str(classifier), tmp_path, task="image-classification")).model
    assert reused.peft_config["default"].modules_to_save == ["classifier"]
    # the tiny checkpoint has no captioning decoder: a new, tied decoder cannot train beside adapters
    with pytest.raises(ValueError, match="has no pretrained lm_head, text_decoder for captioning"):
        build_trainer(_args(pretrained, tmp_path, task="captioning"))


def test_captioning_recipe_with_lora_on_a_checkpoint_with_a_decoder(pretrained, tmp_path):
    folder = tmp_path / "captioner"
    torch.manual_seed(0)
    XModalForConditionalGeneration(XModalConfig.from_pretrained(pretrained)).save_pretrained(folder)
    XModalProcessor.from_pretrained(pretrained).save_pretrained(folder)
    metrics = finetune(_args(str(folder), tmp_path, task="captioning", max_steps=2))
    assert len(metrics["losses"]) == 2 and 0.0 <= metrics["eval_bleu4"] <= 1.0
    adapter = json.loads((tmp_path / "finetuned" / ADAPTER_FOLDER / "adapter_config.json").read_text())
    assert any(name.startswith("text_decoder.") and "cross_attn" in name for name in adapter["target_modules"])
    assert any(name.startswith("vision_model.") for name in adapter["target_modules"])
    assert adapter["modules_to_save"] is None
