"""The baseline every xmodal recipe is measured against: a plain transformers `CLIPModel` trained from scratch on the
same data for the same wall-clock, evaluated on the same held-out rows with the same retrieval metric.

The setup is what a transformers user would write: `CLIPModel` sized like the xmodal preset (`clip_config_like`:
equal widths, depths, heads, image and patch size, vocabulary), AdamW (lr 5e-4, weight decay 0.1 on weight
matrices, 50 warmup steps, cosine decay fitted to the time budget as `xmodal pretrain --max_time` fits it), random
resized crops at scale 0.7-1 (no flip: the captions name left and right), batch 128, and one caption per scene (the
synthetic rows' first, `text`). Images go through the same processor and the texts through the same tokenizer as
xmodal's run, so only the model and the recipe differ.

    python bench/clip_baseline.py --max_time 6m            # the demo data: 8,000 synthetic scenes, 1,000 test scenes
    python bench/clip_baseline.py --max_time 10m --dataset ../shared/data/emoji-google --split_column emoji_split

`--model xmodal` trains an `XModalModel` of the same preset (`--tower_style`, `--config_overrides`) in this very loop
instead, so that only the model differs (bench/RESULTS.md, "Tower style"):

    python bench/clip_baseline.py --max_steps 300 --batch_size 64 --warmup_steps 25 --image_size 48 --patch_size 16 \
        --model xmodal --tower_style clip --tag xmodal_clip_style

Writes `bench/results/clip_baseline[_<tag>].json` (`--tag`): the test retrieval metrics, steps, pairs/s, machine.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import clip_config_like, machine, machine_line, publish
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, CLIPModel

from xmodal import XModalConfig, XModalModel
from xmodal.training.data.augmentations import ImageAugmentation, PairAugmentation
from xmodal.training.data.collate import ImageTextCollator
from xmodal.training.data.pipeline import DataArguments, load_pretraining_data
from xmodal.training.evaluation.evaluator import retrieval_metrics
from xmodal.training.pretraining.builders import build_processor, optimizer_param_groups
from xmodal.training.pretraining.schedule import BudgetedSchedule, parse_duration

DEMO_TOKENIZER = "training/assets/demo-tokenizer"


def _clip_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: batch[name] for name in ("input_ids", "attention_mask", "pixel_values")}


@torch.no_grad()
def evaluate_clip(model: CLIPModel, loader: DataLoader) -> dict[str, float]:
    """Text->image and image->text retrieval over every (image, first caption) pair of the loader's rows."""
    model.eval()
    images, texts = [], []
    for batch in loader:
        inputs = _clip_inputs(batch)
        images.append(F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1))
        texts.append(
            F.normalize(
                model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).pooler_output,
                dim=-1,
            )
        )
    return retrieval_metrics(torch.cat(texts) @ torch.cat(images).t())


def train_clip(options: argparse.Namespace) -> dict[str, Any]:
    """Trains the baseline for `options.max_time` and returns its test metrics and throughput."""
    torch.manual_seed(options.seed)
    data_args = DataArguments(
        dataset=options.dataset, text_column=options.text_column, split_column=options.split_column, seed=options.seed
    )
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)
    vision = {"image_size": options.image_size, "patch_size": options.patch_size}
    overrides = json.loads(options.config_overrides)
    config = XModalConfig.from_preset(
        options.preset,
        options.tower_style,
        **{
            **overrides,
            "text_config": {**overrides.get("text_config", {}), "vocab_size": len(tokenizer)},
            "vision_config": {
                **overrides.get("vision_config", {}),
                **{name: value for name, value in vision.items() if value is not None},
            },
        },
    )
    data = load_pretraining_data(data_args, config.vision_config.image_size)
    processor = build_processor(tokenizer, config)
    if options.model == "xmodal":
        model = XModalModel(config)
    else:
        model = CLIPModel(clip_config_like(config, sequence_length=options.max_length))
    augmentation = PairAugmentation(
        image=ImageAugmentation(
            crop_scale=(0.7, 1.0),
            brightness=0.0,
            contrast=0.0,
            saturation=0.0,
            image_mean=tuple(processor.image_processor.image_mean),
            image_std=tuple(processor.image_processor.image_std),
        ),
        horizontal_flip="off",
    )
    train_loader = DataLoader(
        data.train,
        batch_size=options.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=ImageTextCollator(processor, options.max_length, augmentation=augmentation),
    )
    test_loader = DataLoader(
        data.evaluation, batch_size=250, collate_fn=ImageTextCollator(processor, options.max_length)
    )
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, options.weight_decay), lr=options.learning_rate)
    max_seconds = parse_duration(options.max_time)
    scheduler = BudgetedSchedule(optimizer, options.warmup_steps, options.max_steps, max_seconds)
    model.train()
    step, start, step_seconds = 0, time.perf_counter(), 0.0
    losses: list[float] = []
    while time.perf_counter() - start + step_seconds <= max_seconds:
        for batch in train_loader:
            step_start = time.perf_counter()
            if step_start - start + step_seconds > max_seconds or step == options.max_steps:
                break
            loss = model(**_clip_inputs(batch), return_loss=True).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step(step, time.perf_counter() - start)
            losses.append(loss.item())
            step_seconds = time.perf_counter() - step_start
        else:
            continue
        break
    train_seconds = time.perf_counter() - start
    metrics = evaluate_clip(model, test_loader)
    return {
        "train_steps": step,
        "train_seconds": round(train_seconds, 1),
        "pairs_per_s": round(step * options.batch_size / train_seconds, 1),
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        **{f"test_{name}": value for name, value in metrics.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_time", default="6m", help="Training wall-clock budget (90s, 6m, 00:06:00).")
    parser.add_argument(
        "--max_steps", type=int, default=None, help="Step budget as well (the run ends at whichever comes first)."
    )
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--text_column", default="text", help="One caption per row (the synthetic rows' first).")
    parser.add_argument("--split_column", default=None)
    parser.add_argument("--tokenizer", default=DEMO_TOKENIZER)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max_length", type=int, default=40)
    parser.add_argument("--image_size", type=int, default=None, help="Image side (default: the preset's, 64).")
    parser.add_argument("--patch_size", type=int, default=None, help="ViT patch side (default: the preset's, 8).")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="Suffix of the result file.")
    parser.add_argument(
        "--model", choices=("clip", "xmodal"), default="clip", help="Train CLIPModel, or XModalModel in the same loop."
    )
    parser.add_argument("--tower_style", default="bert", help="With --model xmodal: the preset's tower style.")
    parser.add_argument("--config_overrides", default="{}", help="JSON of XModalConfig fields over the preset.")
    options = parser.parse_args()
    result = {"machine": machine(), "options": vars(options), **train_clip(options)}
    recalls = " / ".join(f"{100 * result[f'test_text_to_image_R@{k}']:.1f}" for k in (1, 5, 10))
    markdown = (
        f"{'CLIPModel baseline' if options.model == 'clip' else 'XModalModel in the baseline loop'}, {options.dataset}, {result['train_seconds']} s ({result['train_steps']} steps, "
        f"{result['pairs_per_s']} pairs/s): text->image R@1/5/10 = {recalls} %\n\n{machine_line(result['machine'])}\n"
    )
    publish(f"clip_baseline{'_' + options.tag if options.tag else ''}", result, markdown)


if __name__ == "__main__":
    main()
