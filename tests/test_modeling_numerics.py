"""Numerical robustness: the logit scale stays clamped (at init, after optimizer steps pushing it up, in the training
loop); the contrastive and sigmoid losses stay finite and accurate for extreme logits (embeddings scaled to +-1e4);
bf16 and fp16 autocast on CPU give finite losses and gradients for the multi-task model on the embedded data.

Half precision and +-1e4: the similarity of two such embeddings (~1e9 for 16 dimensions) and the loss itself exceed
fp16's largest value (65504), so raw +-1e4 embeddings are tested in float32 and bf16 (float32's range); in fp16 the
model's own path is tested, whose projections may reach +-1e4 but whose embeddings are normalised before the
similarities (the loss functions expect L2-normalised embeddings)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from xmodal import (
    XModalForPreTraining,
    XModalModel,
    contrastive_loss,
    negatives_contrastive_loss,
    nt_xent_loss,
    siglip_loss,
)
from xmodal.processing import train_tokenizer
from xmodal.training import PretrainArguments, pretrain
from xmodal.training.data import ANSWER_VOCAB, load_image_text_dataset, with_lazy_decoding
from xmodal.training.data.collate import ImageTextCollator
from xmodal.training.losses import ContrastiveLoss
from xmodal.training.pretraining.arguments import parse_objectives
from xmodal.training.pretraining.builders import build_config, build_processor

MAX_LOG_SCALE = math.log(100.0)

# --- the logit scale ---------------------------------------------------------------------------------------------


def test_the_logit_scale_stays_clamped_when_optimizer_steps_push_it_up(tester):
    model = XModalModel(tester.get_config())
    assert model.clamped_logit_scale().item() == pytest.approx(math.exp(model.config.logit_scale_init_value))
    optimizer = torch.optim.AdamW([model.logit_scale], lr=1.0, weight_decay=0.0)
    inputs = tester.get_inputs()
    for _ in range(5):  # larger logits lower this loss: each step pushes the scale up
        loss = -model(**inputs).logits_per_text.abs().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.logit_scale.item() > MAX_LOG_SCALE + 1.0  # the parameter went past the bound ...
    assert model.clamped_logit_scale().item() == pytest.approx(100.0)  # ... the scale in use did not
    optimizer.zero_grad()
    out = model(**inputs, return_loss=True)
    assert out.logits_per_text.abs().max().item() <= 100.0 + 1e-3 and torch.isfinite(out.loss)
    # beyond the bound the clamp passes no gradient: the training loop clamps the parameter itself (next test)
    out.loss.backward()
    assert model.logit_scale.grad.item() == 0.0


def test_the_training_loop_clamps_the_parameter_and_bf16_autocast_trains(tmp_path):
    """A logit scale initialised above the bound (log 1000) is clamped to log(100) by the loop's first step; the run
    uses bf16 autocast on the CPU (Accelerate's mixed precision) and every loss is finite."""
    tower = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2}
    overrides = {
        "vision_config": {**tower, "image_size": 16, "patch_size": 4},
        "text_config": tower,
        "cross_config": tower,
        "projection_dim": 24,
        "logit_scale_init_value": math.log(1000.0),
    }
    args = PretrainArguments(
        output_dir=str(tmp_path / "run"),
        config_overrides=json.dumps(overrides),
        objectives="contrastive,itm,mlm",
        mixed_precision="bf16",
        max_steps=3,
        warmup_steps=0,
        save_steps=3,
        batch_size=8,
        num_train_examples=24,
        num_eval_examples=8,
        eval_batch_size=8,
        vocab_size=64,
    )
    metrics = pretrain(args)
    assert len(metrics["losses"]) == 3 and all(math.isfinite(loss) for loss in metrics["losses"])
    assert metrics["nonfinite_steps"] == 0
    logit_scale = load_file(tmp_path / "run" / "model.safetensors")["logit_scale"].item()
    assert 0.0 <= logit_scale <= MAX_LOG_SCALE + 1e-6


# --- extreme logits ----------------------------------------------------------------------------------------------


def _extreme_embeddings(dtype: torch.dtype, batch_size: int = 6, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of +-1e4 (signs at random), the matching pairs anti-aligned: every positive has the
    lowest similarity of its row, the hardest case for a softmax or a sigmoid."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 2, (batch_size, dim), generator=generator).double() * 2e4 - 1e4
    texts = torch.randint(0, 2, (batch_size, dim), generator=generator).double() * 2e4 - 1e4
    texts[:, : dim // 2] = -images[:, : dim // 2]
    return images.to(dtype), texts.to(dtype)


def _queue_negatives(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    positive = (images * texts).sum(dim=1)
    negatives = texts @ images.flip(0).t()
    return negatives_contrastive_loss(100.0 * positive, 100.0 * negatives)


LOSSES = {
    "infonce": lambda images, texts: contrastive_loss(100.0 * texts @ images.t()),
    "infonce_smoothed": lambda images, texts: contrastive_loss(100.0 * texts @ images.t(), label_smoothing=0.1),
    "siglip": lambda images, texts: siglip_loss(10.0 * texts @ images.t() - 10.0),
    "queue_negatives": _queue_negatives,
    "nt_xent_views": lambda images, texts: nt_xent_loss(images, texts, 100.0),
    "training_infonce": lambda images, texts: ContrastiveLoss()(images, texts, 100.0),
    "training_infonce_local": lambda images, texts: ContrastiveLoss(0.1, local_loss=True)(images, texts, 100.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_finite_and_accurate_for_embeddings_scaled_to_1e4(name, dtype):
    images, texts = (tensor.requires_grad_() for tensor in _extreme_embeddings(dtype))
    loss = LOSSES[name](images, texts)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(images.grad).all() and torch.isfinite(texts.grad).all()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0
    reference = LOSSES[name](*_extreme_embeddings(torch.float64))
    assert loss.double().item() == pytest.approx(reference.item(), rel=1e-5 if dtype == torch.float32 else 3e-2)
    if name.startswith(("infonce", "training")):
        assert reference.item() > 1e9  # the case is extreme indeed: logits in the 1e10s


@pytest.mark.parametrize("loss_type", ["nt_xent", "siglip"])
def test_model_logits_of_embeddings_scaled_to_1e4_give_finite_losses(tester, loss_type):
    model = XModalModel(tester.get_config(contrastive_loss_type=loss_type))
    images, texts = (tensor.requires_grad_() for tensor in _extreme_embeddings(torch.float32))
    loss = model.contrastive_objective(model.logits(images, texts))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(images.grad).all() and torch.isfinite(model.logit_scale.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss_type", ["nt_xent", "siglip"])
def test_autocast_losses_are_finite_when_projections_reach_1e4(tester, loss_type, dtype):
    """The projections scaled so that the unnormalised image and text features reach +-1e4 (fp16 holds them; their
    squares do not, so the normalisation must not be computed in fp16)."""
    torch.manual_seed(0)
    model = XModalModel(tester.get_config(contrastive_loss_type=loss_type))
    inputs = tester.get_inputs()
    with torch.no_grad():
        for projection, features in (
            (model.visual_projection, model.get_image_features(inputs["pixel_values"]).pooler_output),
            (
                model.text_projection,
                model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output,
            ),
        ):
            projection.weight.mul_(1e4 / features.abs().max())
        reference = model(**inputs, return_loss=True).loss
    with torch.autocast("cpu", dtype=dtype):
        out = model(**inputs, return_loss=True)
        features = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert features.dtype == dtype and features.abs().max().item() > 5e3
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(reference.item(), rel=5e-2)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


# --- autocast on the embedded data -------------------------------------------------------------------------------

_TOWER = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2}
OBJECTIVE_LOSSES = ("contrastive", "itm", "mlm", "mim", "captioning", "vqa")


@pytest.fixture(scope="module")
def embedded_batch() -> tuple[dict[str, torch.Tensor], object]:
    """A batch of 8 procedural scenes (the embedded data) with captions and questions, and the tokenizer."""
    rows = list(
        with_lazy_decoding(
            load_image_text_dataset(
                "synthetic", split="train", builder_kwargs={"num_train": 8, "num_validation": 1, "num_test": 1}
            )
        )
    )
    corpus = [caption for row in rows for caption in row["captions"]] + [q for row in rows for q in row["questions"]]
    tokenizer = train_tokenizer(corpus, vocab_size=96, model_max_length=24)
    return rows, tokenizer


def _multitask_model(tokenizer, loss_type: str) -> tuple[XModalForPreTraining, ImageTextCollator]:
    overrides = {
        "vision_config": {**_TOWER, "image_size": 32, "patch_size": 8},
        "text_config": _TOWER,
        "cross_config": _TOWER,
        "projection_dim": 24,
    }
    args = PretrainArguments(
        output_dir="unused",
        config_overrides=json.dumps(overrides),
        objectives="all",
        contrastive_loss_type=loss_type,
        queue_size=16 if loss_type == "nt_xent" else 0,
        max_length=24,
    )
    config = build_config(args, tokenizer, parse_objectives("all"))
    torch.manual_seed(0)
    model = XModalForPreTraining(config).train()
    return model, ImageTextCollator(build_processor(tokenizer, config), 24, answer_vocab=ANSWER_VOCAB)


@pytest.mark.parametrize(
    ("loss_type", "dtype"),
    [("nt_xent", torch.bfloat16), ("siglip", torch.float16)],
    ids=["infonce_with_queue-bf16", "siglip-fp16"],
)
def test_multitask_losses_are_finite_under_cpu_autocast_on_the_embedded_data(embedded_batch, loss_type, dtype):
    """Every objective's loss (InfoNCE with the momentum queue or SigLIP, ITM, MLM, MIM, captioning, VQA) under CPU
    autocast is finite and within 5% of float32 on the same weights and draws; the gradients are finite."""
    rows, tokenizer = embedded_batch
    model, collator = _multitask_model(tokenizer, loss_type)
    batch = collator(rows)
    state = {key: value.clone() for key, value in model.state_dict().items()}

    def run(autocast: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        model.load_state_dict(state)  # the same weights and queue for both runs
        model.zero_grad()
        torch.manual_seed(1)  # the same masks and ITM negatives
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(**batch, return_loss=True)
        out.loss.backward()
        losses = {name: out[f"{name}_loss"].item() for name in OBJECTIVE_LOSSES}
        return {"total": out.loss.item(), **losses}, {n: p.grad for n, p in model.named_parameters()}

    reference, _ = run(autocast=False)
    losses, gradients = run(autocast=True)
    for name, value in losses.items():
        assert math.isfinite(value), name
        assert value == pytest.approx(reference[name], rel=5e-2, abs=1e-2), name
    for name, gradient in gradients.items():
        assert gradient is None or torch.isfinite(gradient).all(), name
    assert sum(gradient is not None for gradient in gradients.values()) > len(gradients) // 2
