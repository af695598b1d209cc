"""xmodal's training step against what a user would pick instead, at equal model sizes, on real caption lengths
(issue 18, items 2 and 3).

Padding (`--only padding`): a contrastive step (forward + backward + fused AdamW, lr 1e-4, weight decay 0.01, as in
`bench/train_step.py`) of three models of the preset's size, each fed as its own recipe feeds it:

- xmodal: `XModalForPreTraining` with the contrastive objective, as `xmodal pretrain` builds it (`build_config`: CLIP
  tower style), its captions tokenized as `ImageTextCollator` tokenizes them (`padding=True`: to the longest caption
  of the batch); on CPU its text tower skips the padding;
- clip-run_clip: transformers' `CLIPModel` of the same size (`clip_config_like`, as in `bench/train_step.py`), its
  captions padded as `examples/pytorch/contrastive-image-text/run_clip.py` pads them: `padding="max_length"` at its
  default `max_seq_length` of 128 (`DataTrainingArguments`), clamped to the preset's text positions (64 for tiny, 77
  for small; base keeps 128), since a CLIP text tower cannot embed more positions than it has;
- open_clip: `open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg)` built from config dicts with the preset's
  widths, depths, heads, MLP ratio, image and patch size (no weights), its text at open_clip's fixed 77-token context
  (`CLIPTextCfg.context_length`), pooled at [SEP] (`pool_type="eos"`), trained with `open_clip.loss.ClipLoss`.
  open_clip imports torchvision's transforms in its package `__init__`; PyPI's torchvision links CUDA torch and
  does not import beside the CPU wheel, so where `import open_clip` fails, its model and loss modules are loaded
  without the package `__init__`, with a stand-in for the one torchvision name they import (`FrozenBatchNorm2d`,
  used only to freeze ResNet BatchNorms). Not installed: the variant is skipped with a message
  (`pip install open-clip-torch --no-deps`, the `bench` extra).

All three see the same captions and the same token ids: one WordPiece tokenizer (`train_tokenizer`, vocabulary 4,096,
trained on every available corpus, so that only the padding policy differs; WordPiece training breaks frequency ties
in hash order, so the vocabulary can differ slightly between processes, see training/assets/demo-tokenizer), the same
truncation (the shortest of the three limits), the same random images (captions are what this measures). Corpora
(`--corpora`): `synthetic` (the `text` column of `make_synthetic_dataset`, what `xmodal pretrain` trains on by
default), `emoji-name` and `emoji-keywords` (the `name` and the comma-joined `keywords` of
`../shared/data/emoji-google/metadata.jsonl`; skipped with a message when that folder is absent, an error under
CI=true). Each step takes the next of `--num_batches` caption batches (drawn once, seed 0), in the same order for
every variant, so the round-by-round ratios compare the same batch.

FLAVA (`--only flava`): transformers' `FlavaForPreTraining` built from a `FlavaConfig` (no weights) with xmodal's
image, text and fusion widths, depths, heads, MLP sizes, dropouts, image and patch size and projection dimension, and
its default `FlavaImageCodebook` (DALL-E's encoder, frozen, no weights) for the MIM targets. Its step is what its
docs train: an unmasked pass (image and text towers), a masked pass (MLM-masked text from
`DataCollatorForLanguageModeling`, BEiT block-masked patches from `FlavaImageProcessorPil(return_image_mask=True)`
at FLAVA's share of 75/196 patches, the multimodal encoder over both) and the losses ITM (`itm_labels`: half the pairs
negatives, their image swapped for another's), masked multimodal modelling of text and image, and the global
contrastive loss; `flava` also runs the codebook on `codebook_pixel_values` each step as the processor provides them,
`flava-mim-labels` gets the codebook's labels precomputed. Against it, on the synthetic data through xmodal's
collator (captions, questions): `XModalForPreTraining` with contrastive only, with contrastive + ITM + MLM + MIM
(FLAVA's four objectives), and with every objective (also captioning and VQA), all in the BERT tower style that MLM
needs. Reported: each step's time per pair, FLAVA's time over xmodal's four-objective step, and xmodal's multi-task
steps over its contrastive step. The architectures differ where the libraries do: FLAVA's multimodal encoder is
self-attention over the concatenated image and text tokens, xmodal's fusion is text-to-image cross-attention; FLAVA's
masked pass keeps every patch (mask tokens), xmodal's MIM encodes the visible quarter (MAE).

Every variant's loss is checked finite before timing. Steps are timed alternately in one process (`time_alternating`:
median of `--repeats` rounds after `--warmup`); a ratio is the median of the per-round ratios with their range.

    python bench/peers.py [--presets tiny small] [--batch_sizes 64] [--repeats 5] [--warmup 2] [--num_batches 4]
        [--corpora synthetic emoji-name emoji-keywords] [--only padding|flava] [--no_write]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import itertools
import json
import math
import random
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    EMOJI,
    PAD_TOKEN_ID,
    SEP_TOKEN_ID,
    clip_config_like,
    emoji_available,
    fused_adamw,
    machine,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    ratio_cell,
    time_alternating,
    write_result,
)
from transformers import (  # noqa: E402
    CLIPModel,
    DataCollatorForLanguageModeling,
    FlavaConfig,
    FlavaForPreTraining,
)
from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil  # noqa: E402

from xmodal import XModalConfig, XModalForPreTraining  # noqa: E402
from xmodal.processing import train_tokenizer  # noqa: E402
from xmodal.training import ImageTextCollator, PretrainArguments, build_config, build_processor  # noqa: E402
from xmodal.training.data import ANSWER_VOCAB, caption_corpus, make_synthetic_dataset  # noqa: E402

CORPORA = ("synthetic", "emoji-name", "emoji-keywords")
RUN_CLIP_MAX_SEQ_LENGTH = 128
"""`DataTrainingArguments.max_seq_length`'s default in transformers' examples/pytorch/contrastive-image-text/run_clip.py,
which tokenizes with `padding="max_length", truncation=True` at that length."""
OPEN_CLIP_CONTEXT = 77
"""open_clip's text context (`CLIPTextCfg.context_length`): its tokenizer pads every caption to it."""
TOKENIZER_VOCAB = 4096
SYNTHETIC_ROWS = 2048
FLAVA_MASK_SHARE = 75 / 196
"""FlavaImageProcessor's default `total_mask_patches` (75) of its 14 x 14 patches; `mask_group_min_patches` (16)
scales alike."""
FOUR_OBJECTIVES = "contrastive,itm,mlm,mim"


# ---------------------------------------------------------------------------------------------------------------------
# Captions and the shared tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def emoji_captions(path: Path = EMOJI) -> dict[str, list[str]] | None:
    """The emoji set's names and comma-joined keywords (`metadata.jsonl`); None (with a message) when the folder is
    absent, an error under CI=true."""
    if not emoji_available(path, "the emoji corpora"):
        return None
    metadata = (path / "metadata.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in metadata.splitlines() if line.strip()]
    return {
        "emoji-name": [row["name"] for row in rows],
        "emoji-keywords": [", ".join(row["keywords"]) for row in rows if row.get("keywords")],
    }


def synthetic_rows(num_rows: int, image_size: int) -> Any:
    """`num_rows` examples of the embedded procedural data at `image_size` px (seed 0; the captions do not depend on
    the image size)."""
    return make_synthetic_dataset(num_train=num_rows, num_validation=0, num_test=0, seed=0, image_size=image_size)[
        "train"
    ]


def load_corpora() -> tuple[dict[str, list[str]], list[str]]:
    """Every available corpus of captions, and the tokenizer's training texts (all of them, with the synthetic
    questions and answers as `xmodal pretrain` trains its tokenizer)."""
    synthetic = synthetic_rows(SYNTHETIC_ROWS, 16)
    corpora: dict[str, list[str]] = {"synthetic": list(synthetic["text"])}
    texts = list(caption_corpus(synthetic))
    emoji = emoji_captions()
    if emoji is not None:
        corpora.update(emoji)
        texts += [text for captions in emoji.values() for text in captions]
    return corpora, texts


def caption_batches(captions: list[str], batch_size: int, count: int, seed: int = 0) -> list[list[str]]:
    """`count` batches of `batch_size` captions, each drawn without replacement (with replacement when the corpus is
    smaller than a batch)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        if len(captions) >= batch_size:
            indices = torch.randperm(len(captions), generator=generator)[:batch_size]
        else:
            indices = torch.randint(len(captions), (batch_size,), generator=generator)
        batches.append([captions[int(i)] for i in indices])
    return batches


# ---------------------------------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------------------------------


LossFunction = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def hf_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of an xmodal or transformers model: `model(**inputs, return_loss=True).loss`."""
    return model(**inputs, return_loss=True).loss


def train_step(model: torch.nn.Module, loss_of: LossFunction, batches: list[dict[str, torch.Tensor]]) -> Callable:
    """A training step as a closure: the loss of the next batch (cycling; torch's RNG seeded with the call's index, so
    every variant draws the same masks and dropout seeds at the same call), backward, AdamW, `zero_grad`."""
    model.train()
    optimizer = fused_adamw(model)
    calls = itertools.count()

    def step() -> None:
        index = next(calls)
        torch.manual_seed(index)
        loss = loss_of(model, batches[index % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def checked_loss(name: str, model: torch.nn.Module, loss_of: LossFunction, inputs: dict[str, torch.Tensor]) -> float:
    """The loss of one forward in training mode (no gradients); raises unless it is finite."""
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        loss = float(loss_of(model, inputs))
    if not math.isfinite(loss):
        raise RuntimeError(f"{name}: the loss is not finite ({loss}) before timing.")
    return loss


def timed(
    variants: dict[str, tuple[torch.nn.Module, LossFunction, list[dict[str, torch.Tensor]]]],
    batch_size: int,
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, Any]]:
    """Checks each variant's loss, times their steps alternately; per variant: the first batch's loss, the seconds of
    each round, their median and pairs/s."""
    losses = {
        name: checked_loss(name, model, loss_of, batches[0]) for name, (model, loss_of, batches) in variants.items()
    }
    steps = {name: train_step(model, loss_of, batches) for name, (model, loss_of, batches) in variants.items()}
    times = time_alternating(steps, repeats=repeats, warmup=warmup)
    return {
        name: {
            "loss": losses[name],
            "seconds": times[name],
            "median_seconds": median(times[name]),
            "pairs_per_second": batch_size / median(times[name]),
            "ms_per_pair": 1000 * median(times[name]) / batch_size,
        }
        for name in variants
    }


def ratio(result: dict[str, dict[str, Any]], numerator: str, denominator: str) -> dict[str, float]:
    """Per-round ratio of `numerator`'s step time over `denominator`'s (`paired_ratio`)."""
    return paired_ratio(result[numerator]["seconds"], result[denominator]["seconds"])


# ---------------------------------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------------------------------


def load_open_clip() -> tuple[Any, Any, str] | None:
    """open_clip's `CLIP` and `ClipLoss` classes and how they were loaded (`"package"`, or `"model modules"`: without
    the package `__init__` and with a stand-in `torchvision.ops.misc`, where `import open_clip` fails, as it does
    beside the CPU torch wheel); None (with a message) when open_clip is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        print("Skipping open_clip: it is not installed (`pip install open-clip-torch --no-deps`, the `bench` extra).")
        return None
    # probe in a child: a torchvision that fails half-way through its import would leave this process's torch
    # operator registry half-filled
    probe = subprocess.run([sys.executable, "-c", "import open_clip"], capture_output=True, text=True)
    if probe.returncode == 0:
        import open_clip.loss
        import open_clip.model

        return open_clip.model.CLIP, open_clip.loss.ClipLoss, "package"
    reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit {probe.returncode}"
    print(f"`import open_clip` fails ({reason}): loading its model and loss modules without the package __init__.")

    class FrozenBatchNorm2d(torch.nn.Module):  # open_clip.utils imports it for freezing ResNet BatchNorms only
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("torchvision is not importable here: FrozenBatchNorm2d is a stand-in.")

    stand_ins = {}
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
        module = types.ModuleType(name)
        module.__path__ = []  # type: ignore[attr-defined]
        stand_ins[name] = module
    stand_ins["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("open_clip", None, is_package=True))
    package.__path__ = list(spec.submodule_search_locations)
    previous = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    sys.modules["open_clip"] = package
    try:
        model_module = importlib.import_module("open_clip.model")
        loss_module = importlib.import_module("open_clip.loss")
    finally:
        for name, module in previous.items():  # the stand-ins must not make torchvision look installed
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return model_module.CLIP, loss_module.ClipLoss, "model modules"


def open_clip_like(clip_class: Any, config: XModalConfig) -> torch.nn.Module:
    """An open_clip `CLIP` of the xmodal config's size: the same widths, depths, heads, MLP ratio, image and patch
    size, vocabulary and projection dimension; text at open_clip's 77-token context, pooled at [SEP]."""
    vision, text = config.vision_config, config.text_config
    vision_cfg = {
        "layers": vision.num_hidden_layers,
        "width": vision.hidden_size,
        "head_width": vision.hidden_size // vision.num_attention_heads,
        "mlp_ratio": vision.intermediate_size / vision.hidden_size,
        "patch_size": vision.patch_size,
        "image_size": vision.image_size,
    }
    text_cfg = {
        "context_length": OPEN_CLIP_CONTEXT,
        "vocab_size": text.vocab_size,
        "width": text.hidden_size,
        "heads": text.num_attention_heads,
        "layers": text.num_hidden_layers,
        "mlp_ratio": text.intermediate_size / text.hidden_size,
        "pad_id": PAD_TOKEN_ID,
        "eos_id": SEP_TOKEN_ID,
        "pool_type": "eos",
    }
    return clip_class(embed_dim=config.projection_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True)


def open_clip_loss(loss_class: Any) -> LossFunction:
    criterion = loss_class()

    def loss_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(inputs["pixel_values"], inputs["input_ids"])
        return criterion(out["image_features"], out["text_features"], out["logit_scale"])

    return loss_of


# ---------------------------------------------------------------------------------------------------------------------
# Padding: xmodal vs CLIPModel (run_clip) vs open_clip
# ---------------------------------------------------------------------------------------------------------------------


def token_stats(batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean real tokens per caption and mean padded length over the batches."""
    real = torch.cat([batch["attention_mask"].sum(1) for batch in batches]).float()
    return {
        "real_tokens_mean": float(real.mean()),
        "real_tokens_max": int(real.max()),
        "padded_length_mean": sum(batch["input_ids"].shape[1] for batch in batches) / len(batches),
    }


def bench_padding(
    preset: str,
    batch_size: int,
    corpus: str,
    captions: list[str],
    tokenizer: Any,
    open_clip: tuple[Any, Any, str] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    positions = XModalConfig.from_preset(preset).text_config.max_position_embeddings
    clip_length = min(RUN_CLIP_MAX_SEQ_LENGTH, positions)
    truncation = min(clip_length, OPEN_CLIP_CONTEXT)
    config = build_config(PretrainArguments(preset=preset, max_length=truncation), tokenizer, ("contrastive",))
    texts = caption_batches(captions, batch_size, args.num_batches)
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    pixels = [torch.randn(batch_size, 3, size, size, generator=generator) for _ in texts]

    def tokenized(padding: str | bool, length: int) -> list[dict[str, torch.Tensor]]:
        """The batches' captions truncated at `truncation` (the same tokens for every variant), padded by `padding`
        (True: to the longest of the batch; "max_length": to `length`)."""
        batches = []
        for batch_texts, pixel_values in zip(texts, pixels):
            tokens = tokenizer(batch_texts, truncation=True, max_length=truncation)
            pad_to = {"max_length": length} if padding == "max_length" else {}
            tokens = tokenizer.pad(tokens, padding=padding, return_tensors="pt", **pad_to)
            batches.append(
                {
                    "pixel_values": pixel_values,
                    "input_ids": tokens["input_ids"],
                    "attention_mask": tokens["attention_mask"],
                }
            )
        return batches

    torch.manual_seed(0)
    # ImageTextCollator's tokenization: padding=True (the longest caption of the batch), truncation at max_length
    xmodal_batches = tokenized(True, truncation)
    clip_batches = tokenized("max_length", clip_length)
    variants: dict[str, tuple[torch.nn.Module, LossFunction, list[dict[str, torch.Tensor]]]] = {
        "xmodal": (XModalForPreTraining(config), hf_loss, xmodal_batches),
        "clip-run_clip": (CLIPModel(clip_config_like(config, sequence_length=clip_length)), hf_loss, clip_batches),
    }
    if open_clip is not None:
        clip_class, loss_class, _ = open_clip
        open_clip_batches = tokenized("max_length", OPEN_CLIP_CONTEXT)
        variants["open_clip"] = (open_clip_like(clip_class, config), open_clip_loss(loss_class), open_clip_batches)
    result = timed(variants, batch_size, args.repeats, args.warmup)
    for name, (_, _, batches) in variants.items():
        result[name].update(token_stats(batches))
        result[name]["parameters"] = sum(p.numel() for p in variants[name][0].parameters())
        if name != "xmodal":
            result[name]["xmodal_speedup"] = ratio(result, name, "xmodal")
    truncated = sum(len(tokenizer(text)["input_ids"]) > truncation for batch in texts for text in batch)
    return {
        "preset": preset,
        "batch_size": batch_size,
        "corpus": corpus,
        "run_clip_length": clip_length,
        "truncation": truncation,
        "truncated_captions": truncated,
        "variants": result,
    }


# ---------------------------------------------------------------------------------------------------------------------
# FLAVA vs xmodal's multi-task step
# ---------------------------------------------------------------------------------------------------------------------


def flava_config_like(config: XModalConfig, tokenizer: Any) -> FlavaConfig:
    """A `FlavaConfig` with the xmodal config's image, text and fusion sizes (width, depth, heads, MLP size,
    activation, dropouts), image and patch size, text vocabulary and positions, projection dimension; FLAVA's
    default image codebook (its MIM targets)."""
    vision, text, cross = config.vision_config, config.text_config, config.cross_config

    def tower(sub: Any) -> dict[str, Any]:
        return {
            "hidden_size": sub.hidden_size,
            "num_hidden_layers": sub.num_hidden_layers,
            "num_attention_heads": sub.num_attention_heads,
            "intermediate_size": sub.intermediate_size,
            "hidden_act": sub.hidden_act,
            "hidden_dropout_prob": sub.hidden_dropout_prob,
            "attention_probs_dropout_prob": sub.attention_dropout,
        }

    return FlavaConfig(
        image_config={**tower(vision), "image_size": vision.image_size, "patch_size": vision.patch_size},
        text_config={
            **tower(text),
            "vocab_size": len(tokenizer),
            "max_position_embeddings": text.max_position_embeddings,
            "pad_token_id": tokenizer.pad_token_id,
        },
        multimodal_config=tower(cross),
        hidden_size=cross.hidden_size,  # FLAVA's ITM head reads the top-level width: the multimodal encoder's
        projection_dim=config.projection_dim,
        init_codebook=True,
    )


def flava_batch(rows: list[dict[str, Any]], tokenizer: Any, config: FlavaConfig, max_length: int) -> dict[str, Any]:
    """FLAVA's pretraining inputs for `rows`, as its docs build them: half the pairs ITM negatives (`itm_labels` 0,
    the image swapped for the next negative's), images through `FlavaImageProcessorPil` with the BEiT mask
    (`bool_masked_pos`) and the codebook's pixels, captions padded to the longest (FLAVA's processor example) with
    `DataCollatorForLanguageModeling`'s 15% masking (`input_ids_masked`, `mlm_labels`)."""
    image, size = config.image_config, config.image_config.image_size
    side = size // image.patch_size
    num_patches = side * side
    batch_size = len(rows)
    itm_labels = torch.ones(batch_size, dtype=torch.long)
    negatives = torch.randperm(batch_size)[: batch_size // 2]
    itm_labels[negatives] = 0
    images = [row["image"] for row in rows]
    # each negative takes the image of the next negative (a derangement among them)
    for position, index in enumerate(negatives.tolist()):
        images[index] = rows[int(negatives[(position + 1) % len(negatives)])]["image"]
    processor = FlavaImageProcessorPil(
        size={"height": size, "width": size},
        crop_size={"height": size, "width": size},
        codebook_size={"height": 8 * side, "width": 8 * side},  # the codebook downsamples 8x to the patch grid
        codebook_crop_size={"height": 8 * side, "width": 8 * side},
        input_size_patches=side,
        total_mask_patches=round(FLAVA_MASK_SHARE * num_patches),
        mask_group_min_patches=max(1, round(16 / 196 * num_patches)),
        return_image_mask=True,
        return_codebook_pixels=True,
    )
    pixels = processor(images, return_tensors="pt")
    tokens = tokenizer(
        [row["text"] for row in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    special = torch.isin(
        tokens["input_ids"],
        torch.tensor([tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id]),
    )
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    input_ids_masked, mlm_labels = masker.torch_mask_tokens(tokens["input_ids"].clone(), special)
    return {
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "token_type_ids": torch.zeros_like(tokens["input_ids"]),
        "input_ids_masked": input_ids_masked,
        "mlm_labels": mlm_labels,
        "pixel_values": pixels["pixel_values"],
        "bool_masked_pos": pixels["bool_masked_pos"].bool().flatten(1),
        "codebook_pixel_values": pixels["codebook_pixel_values"],
        "itm_labels": itm_labels,
    }


def with_mim_labels(model: FlavaForPreTraining, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with the codebook's labels precomputed (`mim_labels`) instead of its pixels."""
    inputs = {key: value for key, value in batch.items() if key != "codebook_pixel_values"}
    with torch.no_grad():
        inputs["mim_labels"] = model.image_codebook.get_codebook_indices(batch["codebook_pixel_values"]).flatten(1)
    return inputs


def flava_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # FLAVA writes -100 into `mim_labels` in place: give it a copy so every step sees the same batch
    inputs = {key: value.clone() if key == "mim_labels" else value for key, value in inputs.items()}
    return model(**inputs, return_loss=True).loss


def xmodal_pretraining(preset: str, tokenizer: Any, objectives: str, max_length: int) -> XModalForPreTraining:
    """`XModalForPreTraining` as `xmodal pretrain --objectives ... --tower_style bert` builds it."""
    args = PretrainArguments(preset=preset, objectives=objectives, tower_style="bert", max_length=max_length)
    objective_names = tuple(name.strip() for name in objectives.split(","))
    if objectives == "all":
        from xmodal.training.pretraining.arguments import OBJECTIVES

        objective_names = OBJECTIVES
    model = XModalForPreTraining(build_config(args, tokenizer, objective_names))
    trained = model.pretraining_objectives
    if set(trained) != set(objective_names):
        raise RuntimeError(f"xmodal {objectives}: the model trains {trained}, not {objective_names}.")
    return model


def bench_flava(preset: str, batch_size: int, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    preset_config = XModalConfig.from_preset(preset)
    max_length = min(RUN_CLIP_MAX_SEQ_LENGTH, OPEN_CLIP_CONTEXT, preset_config.text_config.max_position_embeddings)
    data = synthetic_rows(max(SYNTHETIC_ROWS, batch_size * args.num_batches), preset_config.vision_config.image_size)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator)[: batch_size * args.num_batches].tolist()
    row_batches = [[data[i] for i in order[k * batch_size : (k + 1) * batch_size]] for k in range(args.num_batches)]

    torch.manual_seed(0)
    models = {
        "xmodal-contrastive": xmodal_pretraining(preset, tokenizer, "contrastive", max_length),
        "xmodal-4-objectives": xmodal_pretraining(preset, tokenizer, FOUR_OBJECTIVES, max_length),
        "xmodal-all-objectives": xmodal_pretraining(preset, tokenizer, "all", max_length),
    }
    processor = build_processor(tokenizer, models["xmodal-all-objectives"].config)
    collator = ImageTextCollator(processor, max_length, answer_vocab=ANSWER_VOCAB)
    question_keys = ("question_input_ids", "question_attention_mask", "vqa_labels")
    xmodal_all = [collator(rows) for rows in row_batches]
    xmodal_plain = [{k: v for k, v in batch.items() if k not in question_keys} for batch in xmodal_all]

    flava_config = flava_config_like(models["xmodal-4-objectives"].config, tokenizer)
    random.seed(0)  # FLAVA's masking generator draws from Python's RNG
    flava_batches = [flava_batch(rows, tokenizer, flava_config, max_length) for rows in row_batches]
    flava = FlavaForPreTraining(flava_config)
    flava_precomputed = FlavaForPreTraining(flava_config)
    flava_precomputed.load_state_dict(flava.state_dict())
    variants: dict[str, tuple[torch.nn.Module, LossFunction, list[dict[str, torch.Tensor]]]] = {
        "xmodal-contrastive": (models["xmodal-contrastive"], hf_loss, xmodal_plain),
        "xmodal-4-objectives": (models["xmodal-4-objectives"], hf_loss, xmodal_plain),
        "xmodal-all-objectives": (models["xmodal-all-objectives"], hf_loss, xmodal_all),
        "flava": (flava, flava_loss, flava_batches),
        "flava-mim-labels": (
            flava_precomputed,
            flava_loss,
            [with_mim_labels(flava, batch) for batch in flava_batches],
        ),
    }
    result = timed(variants, batch_size, args.repeats, args.warmup)
    for name, (model, _, _) in variants.items():
        result[name]["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ratios = {
        "flava_over_xmodal_4": ratio(result, "flava", "xmodal-4-objectives"),
        "flava_mim_labels_over_xmodal_4": ratio(result, "flava-mim-labels", "xmodal-4-objectives"),
        "xmodal_4_over_contrastive": ratio(result, "xmodal-4-objectives", "xmodal-contrastive"),
        "xmodal_all_over_contrastive": ratio(result, "xmodal-all-objectives", "xmodal-contrastive"),
    }
    shapes = {
        "xmodal": {key: list(value.shape) for key, value in xmodal_all[0].items()},
        "flava": {key: list(value.shape) for key, value in flava_batches[0].items()},
    }
    return {
        "preset": preset,
        "batch_size": batch_size,
        "max_length": max_length,
        "variants": result,
        "ratios": ratios,
        "shapes": shapes,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def markdown(payload: dict[str, Any]) -> str:
    lines = ["## xmodal vs its peers at equal size (`bench/peers.py`)", "", machine_line(payload["machine"])]
    lines.append(
        f"Median of {payload['repeats']} alternating rounds after {payload['warmup']} warm-up steps, "
        f"{payload['num_batches']} caption batches cycled; a ratio is the median per-round ratio (range)."
    )
    if payload["padding"]:
        rows = []
        for entry in payload["padding"]:
            for name, variant in entry["variants"].items():
                speedup = variant.get("xmodal_speedup")
                rows.append(
                    [
                        entry["preset"],
                        entry["corpus"],
                        entry["batch_size"],
                        name,
                        f"{variant['real_tokens_mean']:.1f}",
                        f"{variant['padded_length_mean']:.1f}",
                        f"{variant['median_seconds']:.3f}",
                        f"{variant['pairs_per_second']:.1f}",
                        ratio_cell(speedup) if speedup else "",
                    ]
                )
        header = ["preset", "corpus", "batch", "model", "tokens", "padded to", "s/step", "pairs/s", "xmodal speed-up"]
        lines += [
            "",
            "### Contrastive step, each model padded as its recipe pads",
            "",
            f"open_clip: {payload['open_clip'] or 'skipped (not installed)'}. run_clip pads to "
            f"min({RUN_CLIP_MAX_SEQ_LENGTH}, the preset's text positions); open_clip to {OPEN_CLIP_CONTEXT}; xmodal to "
            "the longest caption of the batch.",
            "",
            markdown_table(header, rows),
        ]
    if payload["flava"]:
        rows = []
        for entry in payload["flava"]:
            ratios = entry["ratios"]
            cells = {
                "flava": ratio_cell(ratios["flava_over_xmodal_4"]) + " xmodal-4-objectives",
                "flava-mim-labels": ratio_cell(ratios["flava_mim_labels_over_xmodal_4"]) + " xmodal-4-objectives",
                "xmodal-4-objectives": ratio_cell(ratios["xmodal_4_over_contrastive"], bold=False)
                + " xmodal-contrastive",
                "xmodal-all-objectives": ratio_cell(ratios["xmodal_all_over_contrastive"], bold=False)
                + " xmodal-contrastive",
            }
            for name, variant in entry["variants"].items():
                rows.append(
                    [
                        entry["preset"],
                        entry["batch_size"],
                        name,
                        f"{variant['median_seconds']:.3f}",
                        f"{variant['ms_per_pair']:.2f}",
                        f"{variant['pairs_per_second']:.1f}",
                        cells.get(name, ""),
                    ]
                )
        header = ["preset", "batch", "step", "s/step", "ms/pair", "pairs/s", "step time over"]
        lines += [
            "",
            "### Multi-task step: FLAVA (contrastive + ITM + MLM + MIM) vs xmodal",
            "",
            "`flava` runs its (frozen) image codebook each step, `flava-mim-labels` gets its labels precomputed; the "
            "xmodal steps are BERT-style towers with contrastive only, FLAVA's four objectives, or all six.",
            "",
            markdown_table(header, rows),
        ]
    lines += ["", f"`{payload['command']}`"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num_batches", type=int, default=4, help="Distinct caption batches, cycled step by step.")
    parser.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA))
    parser.add_argument("--only", choices=("padding", "flava"), help="Run one of the two comparisons.")
    parser.add_argument("--no_write", action="store_true", help="Do not write bench/results.")
    parser.add_argument("--results_name", help="File name (no suffix) under bench/results; default peers[_<only>].")
    args = parser.parse_args(argv)

    corpora, tokenizer_texts = load_corpora()
    tokenizer = train_tokenizer(tokenizer_texts, vocab_size=TOKENIZER_VOCAB, model_max_length=RUN_CLIP_MAX_SEQ_LENGTH)
    payload: dict[str, Any] = {
        "machine": machine(),
        "command": ("python bench/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "num_batches": args.num_batches,
        "vocab_size": len(tokenizer),
        "open_clip": None,
        "padding": [],
        "flava": [],
    }
    if args.only in (None, "padding"):
        open_clip = load_open_clip()
        if open_clip is not None:
            version = importlib.metadata.version("open_clip_torch")
            payload["open_clip"] = f"open_clip_torch {version}, loaded as its {open_clip[2]}"
        for preset in args.presets:
            for batch_size in args.batch_sizes:
                for corpus in args.corpora:
                    if corpus not in corpora:
                        continue  # the emoji set is absent (reported above)
                    entry = bench_padding(preset, batch_size, corpus, corpora[corpus], tokenizer, open_clip, args)
                    payload["padding"].append(entry)
                    print(
                        f"{preset} {corpus} b{batch_size}: "
                        + ", ".join(
                            f"{name} {v['pairs_per_second']:.1f} pairs/s (padded {v['padded_length_mean']:.1f})"
                            for name, v in entry["variants"].items()
                        ),
                        flush=True,
                    )
    if args.only in (None, "flava"):
        for preset in args.presets:
            for batch_size in args.batch_sizes:
                entry = bench_flava(preset, batch_size, tokenizer, args)
                payload["flava"].append(entry)
                print(
                    f"{preset} flava b{batch_size}: "
                    + ", ".join(f"{name} {v['ms_per_pair']:.2f} ms/pair" for name, v in entry["variants"].items()),
                    flush=True,
                )
    print(markdown(payload))
    if not args.no_write:
        name = args.results_name or ("peers" if args.only is None else f"peers_{args.only}")
        print(f"wrote {write_result(name, payload)}")
    return payload


if __name__ == "__main__":
    main()
