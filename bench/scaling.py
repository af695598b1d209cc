"""Scaling tables: contrastive training-step time vs batch size and vs image size at `small` (fp32).

A step is forward + backward + AdamW of `XModalModel(..., return_loss=True)` on random pairs (captions padded to
`--text_length` tokens, lengths 8..text_length), as in `bench/memory.py`.

- batch sizes (`--batch_sizes`, default 16 .. 256) at the preset's image size: one model, the sizes timed in
  alternation in one process;
- image sizes (`--image_sizes`, default 64 .. 224) at `--image_batch_size` (64): each size gets its own model built
  with that `image_size` (position embeddings for its patch grid); the sizes run one after another (alternating
  would hold five models and their AdamW states at once).

Each figure is the median of `--repeats` runs after `--warmup` runs; pairs/s = batch / step time.

    python bench/scaling.py [--preset small] [--repeats 5] [--warmup 2]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    contrastive_train_step,
    machine,
    machine_line,
    markdown_table,
    median,
    preset_config,
    publish,
    random_image_text_batch,
    time_alternating,
)

from xmodal import XModalModel  # noqa: E402


def row(batch_size: int, values: list[float], **fields: Any) -> dict[str, Any]:
    return {
        **fields,
        "batch_size": batch_size,
        "median_s": round(median(values), 4),
        "runs_s": [round(value, 4) for value in values],
        "pairs_per_s": round(batch_size / median(values), 2),
    }


def batch_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    config = preset_config(args.preset, args.smoke)
    model = XModalModel(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = {
        batch: contrastive_train_step(
            model,
            random_image_text_batch(
                batch, config.vision_config.image_size, args.text_length, config.text_config.vocab_size, seed=batch
            ),
            optimizer,
        )
        for batch in args.batch_sizes
    }
    times = time_alternating(steps, repeats=args.repeats, warmup=args.warmup)
    image_size = config.vision_config.image_size
    rows = [row(batch, values, image_size=image_size) for batch, values in times.items()]
    for item in rows:
        print(f"batch {item['batch_size']}: {item['median_s']:.3f} s, {item['pairs_per_s']:.1f} pairs/s", flush=True)
    return rows


def image_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for image_size in args.image_sizes:
        torch.manual_seed(0)
        config = preset_config(args.preset, args.smoke, image_size)
        model = XModalModel(config)
        inputs = random_image_text_batch(
            args.image_batch_size, image_size, args.text_length, config.text_config.vocab_size, seed=image_size
        )
        times = time_alternating({image_size: contrastive_train_step(model, inputs)}, args.repeats, args.warmup)
        patches = (image_size // config.vision_config.patch_size) ** 2
        rows.append(row(args.image_batch_size, times[image_size], image_size=image_size, image_tokens=patches + 1))
        del model, inputs
        item = rows[-1]
        print(f"image {image_size}: {item['median_s']:.3f} s, {item['pairs_per_s']:.1f} pairs/s", flush=True)
    return rows


def markdown(results: dict[str, Any], command: str) -> str:
    batch_rows = [
        [f"{item['batch_size']}", f"{item['median_s']:.3f}", f"{item['pairs_per_s']:.1f}"]
        for item in results["batch_sizes"]
    ]
    image_rows = [
        [f"{item['image_size']}", f"{item['image_tokens']}", f"{item['median_s']:.3f}", f"{item['pairs_per_s']:.1f}"]
        for item in results["image_sizes"]
    ]
    preset, image_size = results["preset"], results["batch_sizes"][0]["image_size"] if results["batch_sizes"] else ""
    return (
        f"## Scaling: contrastive step time at `{preset}` (`bench/scaling.py`)\n\n"
        f"`{command}`\n\n{machine_line(results['machine'])} fp32, forward + backward + AdamW, captions padded to "
        f"{results['text_length']} tokens; median of {results['repeats']} runs after {results['warmup']} warm-up.\n\n"
        f"Batch size ({image_size} px; the sizes alternate in one process):\n\n"
        + markdown_table(["batch", "step (s)", "pairs/s"], batch_rows)
        + f"\n\nImage size (batch {results['image_batch_size']}; one model per size, built for it):\n\n"
        + markdown_table(["image size", "image tokens", "step (s)", "pairs/s"], image_rows)
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[64, 96, 128, 160, 224])
    parser.add_argument("--image_batch_size", type=int, default=64, help="Batch of the image-size sweep.")
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny sizes and 1 repeat (checks it runs); writes nothing."
    )
    parser.add_argument("--no_write", action="store_true", help="Print only; do not write bench/results/.")
    args = parser.parse_args(argv)
    command = "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.preset, args.batch_sizes, args.image_sizes, args.image_batch_size = "tiny", [2, 4], [16, 32], 2
        args.text_length, args.repeats, args.warmup = 8, 1, 0
    results: dict[str, Any] = {
        "machine": machine(),
        "preset": args.preset,
        "text_length": args.text_length,
        "image_batch_size": args.image_batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "batch_sizes": batch_sweep(args),
        "image_sizes": image_sweep(args),
    }
    publish("scaling", results, markdown(results, command.strip()), write=not (args.smoke or args.no_write))
    return results


if __name__ == "__main__":
    main()
