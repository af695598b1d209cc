"""Inference throughput: image embeddings/s and text embeddings/s of xmodal vs transformers' CLIPModel of equal size.

For each preset, `XModalModel` and a `CLIPModel` built by `clip_config_like` (same widths, depths, heads, MLP size,
activation, image and patch size, vocabulary, projection dimension; CLIP's text positions = the text length) embed the
same random batch in eval mode under `torch.inference_mode`: `get_image_features(pixel_values)` on a batch of each
of `--batch_sizes` (1, 16 and 64 images by default) and `get_text_features(input_ids, attention_mask)` on as many
captions padded to `--text_length` tokens (lengths uniform in [8, text_length]). The calls are timed in alternation in one process (median of `--repeats` runs
after `--warmup`, more rounds while the slowest call would get under `--min_seconds` of timed calls); the ratio is
xmodal's embeddings/s over CLIP's, the median of the per-round ratios (issue 18's targets: images >= 1.1x, texts
>= 1.3x).

    python bench/inference.py [--presets tiny small base] [--batch_sizes 1 16 64] [--text_length 32] [--repeats 5]
        [--min_seconds 3]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PRECISIONS,
    clip_config_like,
    machine,
    machine_line,
    markdown_table,
    median,
    on_device,
    paired_ratio,
    preset_config,
    publish,
    random_image_text_batch,
    ratio_cell,
    time_alternating,
)
from transformers import CLIPModel  # noqa: E402

from xmodal import XModalModel  # noqa: E402


def parameters(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def embed_functions(
    xmodal: XModalModel,
    clip: CLIPModel,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> dict[str, Callable[[], None]]:
    """The timed calls; each checks that it returns one projected embedding per input. `xmodal-text-padded` is
    xmodal's text tower computing the padding positions, as CLIPModel does (the gain of skipping them)."""
    pixels = {"pixel_values": inputs["pixel_values"]}
    texts = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    batch_size = inputs["pixel_values"].shape[0]

    def call(function: Callable[..., Any], kwargs: dict[str, torch.Tensor], dim: int) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                embeds = function(**kwargs).pooler_output
            if embeds.shape != (batch_size, dim):
                raise RuntimeError(f"expected embeddings {(batch_size, dim)}, got {tuple(embeds.shape)}")

        return on_device(run, device, dtype)

    def computing_padding(function: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            xmodal.text_model.skip_padding = False
            try:
                function()
            finally:
                xmodal.text_model.skip_padding = None

        return run

    dim = xmodal.config.projection_dim
    return {
        "xmodal-image": call(xmodal.get_image_features, pixels, dim),
        "clip-image": call(clip.get_image_features, pixels, dim),
        "xmodal-text": call(xmodal.get_text_features, texts, dim),
        "xmodal-text-padded": computing_padding(call(xmodal.get_text_features, texts, dim)),
        "clip-text": call(clip.get_text_features, texts, dim),
    }


def run_preset(preset: str, batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """One preset at one batch size: both models' embeddings/s, timed in alternation, and their ratios."""
    config = preset_config(preset, args.smoke)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]
    xmodal = XModalModel(config).eval().to(device)
    clip = CLIPModel(clip_config_like(config, sequence_length=args.text_length)).eval().to(device)
    vision = config.vision_config
    inputs = random_image_text_batch(batch_size, vision.image_size, args.text_length, config.text_config.vocab_size)
    inputs = {key: value.to(device) for key, value in inputs.items()}
    functions = embed_functions(xmodal, clip, inputs, device, dtype)
    times = time_alternating(functions, repeats=args.repeats, warmup=args.warmup, min_seconds=args.min_seconds)
    row: dict[str, Any] = {
        "preset": preset,
        "batch_size": batch_size,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "parameters": {
            "xmodal-image": parameters(xmodal.vision_model, xmodal.visual_projection),
            "clip-image": parameters(clip.vision_model, clip.visual_projection),
            "xmodal-text": parameters(xmodal.text_model, xmodal.text_projection),
            "clip-text": parameters(clip.text_model, clip.text_projection),
        },
    }
    for name, values in times.items():
        row[name] = {
            "median_s": round(median(values), 5),
            "runs_s": [round(value, 5) for value in values],
            "per_s": round(batch_size / median(values), 1),
        }
    for modality in ("image", "text", "text-padded"):
        ratio = paired_ratio(times[f"clip-{modality.removesuffix('-padded')}"], times[f"xmodal-{modality}"])
        row[f"{modality}_ratio"] = {key: round(value, 3) for key, value in ratio.items()}
    return row


def markdown(results: dict[str, Any], command: str) -> str:
    rows = []
    for row in results["runs"]:
        for modality in ("image", "text", "text-padded"):
            tower = modality.removesuffix("-padded")
            rows.append(
                [
                    row["preset"],
                    str(row["batch_size"]),
                    "text (padding computed)" if modality == "text-padded" else modality,
                    f"{row[f'xmodal-{modality}']['per_s']:,.1f}",
                    f"{row[f'clip-{tower}']['per_s']:,.1f}",
                    ratio_cell(row[f"{modality}_ratio"]),
                    f"{row['parameters'][f'xmodal-{tower}'] / 1e6:.1f}M / "
                    f"{row['parameters'][f'clip-{tower}'] / 1e6:.1f}M",
                ]
            )
    table = markdown_table(
        ["preset", "batch", "embeddings", "xmodal /s", "CLIPModel /s", "xmodal / CLIP", "parameters (xmodal / CLIP)"],
        rows,
    )
    return (
        "## Inference: embeddings/s vs CLIPModel of equal size (`bench/inference.py`)\n\n"
        f"`{command}`\n\n{machine_line(results['machine'])} Device: {results['device']}, {results['precision']}, eval mode, `torch.inference_mode`, batches "
        f"of {', '.join(map(str, results['batch_sizes']))}, captions padded to {results['text_length']} tokens (lengths 8-"
        f"{results['text_length']}); median of at least {results['repeats']} runs (more until the slowest call has "
        f"{results['min_seconds']:g} s of timed runs) after {results['warmup']} warm-up, the calls "
        "alternating in one process; a ratio is the median of the per-round ratios, with their range. "
        + (
            'xmodal\'s text tower skips the padding; "padding computed" is the same tower computing it, as '
            "CLIPModel does."
            if results["device"] == "cpu"
            else "On a GPU xmodal's text tower keeps the padding by default: both text rows run the same code."
        )
        + " Targets (issue 18): images >= 1.1x CLIPModel, texts >= 1.3x.\n\n"
        + table
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--batch_sizes", "--batch_size", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--min_seconds", type=float, default=3.0, help="More rounds than --repeats until each call has this much time."
    )
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny sizes and 1 repeat (checks it runs); writes nothing."
    )
    parser.add_argument("--no_write", action="store_true", help="Print only; do not write bench/results/.")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU script (bench/gpu.sh).")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="fp32, or bf16/fp16 autocast.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.batch_sizes, args.text_length, args.repeats, args.warmup = ["tiny"], [1, 4], 16, 1, 0
        args.min_seconds = 0.0
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "batch_sizes": args.batch_sizes,
        "text_length": args.text_length,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "min_seconds": args.min_seconds,
        "runs": [],
    }
    for preset, batch_size in itertools.product(args.presets, args.batch_sizes):
        row = run_preset(preset, batch_size, args)
        results["runs"].append(row)
        print(
            f"{preset}, batch {batch_size}: image {row['xmodal-image']['per_s']}/s vs CLIP {row['clip-image']['per_s']}/s "
            f"({row['image_ratio']['median']}x), text {row['xmodal-text']['per_s']}/s vs CLIP "
            f"{row['clip-text']['per_s']}/s ({row['text_ratio']['median']}x)",
            flush=True,
        )
    command = "python bench/inference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    name = "inference" if device.type == "cpu" else f"inference_{device.type}_{args.precision}"
    publish(name, results, markdown(results, command.strip()), write=not (args.smoke or args.no_write))
    return results


if __name__ == "__main__":
    main()
