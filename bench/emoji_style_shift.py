"""Emoji that generalise across art styles: the emoji recipe against a plain CLIPModel, both evaluated on emoji
drawn in styles they never saw.

Both train from scratch for the same wall-clock budget on all 1,906 google emoji of `../shared/data/emoji-google`.
Other vendors' drawings of the same emoji are the real held-out test and stay out of this repository, so the
styles here are made from the google images (`xmodal.training.data.style_shift`: two heavy re-renderings per image,
e.g. outline-only, posterised, pixel art, warped, recoloured): a `validation` copy (seed 1), on which the xmodal run
selects its model, and a `test` copy (seed 2, other draws), on which both are scored. Text->image retrieval among
the 1,906 emoji names, as the issue measures it.

- xmodal: `xmodal pretrain` with the recipe of the README (`RECIPE` below): captions drawn from the name, "an emoji
  of <name>" and the keywords; strong colour jitter, greyscale, crops of 50-100% and text-aware flips; selection
  on the validation styles.
- CLIPModel: `bench/clip_baseline.py` (transformers' CLIPModel of the same size, the names as captions).

    python bench/emoji_style_shift.py [--max_time 5m] [--data ../shared/data/emoji-google] [--extra OPTIONS --tag NAME]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value, load_dataset
from datasets import Image as ImageFeature

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, markdown_table, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "emoji-google"
RECIPE = (
    "--preset tiny --text_column captions --eval_split test --validation_split validation "
    "--crop_scale 0.5 1 --color_jitter 0.4 --grayscale_probability 0.2 --horizontal_flip mirror_text "
    "--eval_steps 0.2 --load_best_model_at_end --zero_shot_label_column category "
    "--zero_shot_templates '{}|an emoji of {}.'"
)
FEATURES = Features(
    {
        "image": ImageFeature(),
        "text": Value("string"),
        "captions": List(Value("string")),
        "category": Value("string"),
    }
)


def build_splits(data_dir: Path, out: Path) -> dict[str, int]:
    """Writes `train` (every google emoji), `validation` and `test` (two style-shifted copies) as parquet files in
    `out`, a folder that `xmodal pretrain --dataset` and `bench/clip_baseline.py` read; returns the row counts."""
    from xmodal.training.data import make_style_shift_dataset

    rows = load_dataset("imagefolder", data_dir=str(data_dir), split="train")
    columns = {
        "image": [image.convert("RGB") for image in rows["image"]],
        "text": rows["name"],
        "captions": [
            [name, f"an emoji of {name}", ", ".join(keywords)] if keywords else [name, f"an emoji of {name}"]
            for name, keywords in zip(rows["name"], rows["keywords"])
        ],
        "category": rows["category"],
    }
    train = Dataset.from_dict(columns, features=FEATURES)
    splits = {
        "train": train,
        "validation": make_style_shift_dataset(train, seed=1),
        "test": make_style_shift_dataset(train, seed=2),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        split.to_parquet(str(out / f"{name}.parquet"))
    return {name: len(split) for name, split in splits.items()}


def run_xmodal(data: Path, max_time: str, output_dir: Path, recipe: str) -> dict[str, Any]:
    command = [str(Path(sys.executable).with_name("xmodal")), "pretrain", *shlex.split(recipe)]
    command += ["--dataset", str(data), "--max_time", max_time, "--output_dir", str(output_dir)]
    subprocess.run(command + ["--overwrite_output_dir"], check=True, stdout=subprocess.DEVNULL)
    return json.loads((output_dir / "metrics.json").read_text())


def run_clip(data: Path, max_time: str, tag: str) -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "bench" / "clip_baseline.py"), "--dataset", str(data), "--tag", tag]
    subprocess.run(command + ["--max_time", max_time], check=True, stdout=subprocess.DEVNULL)
    return json.loads((ROOT / "bench" / "results" / f"clip_baseline_{tag}.json").read_text())


def _recalls(metrics: dict[str, Any], direction: str) -> list[str]:
    return [f"{100 * metrics[f'test_{direction}_R@{k}']:.1f}" for k in (1, 5, 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_time", default="5m", help="Training wall-clock budget of each model.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--extra", default="", help="xmodal pretrain options added to the recipe (a variant).")
    parser.add_argument("--tag", default="", help="Suffix of the result files (a variant's name).")
    options = parser.parse_args()
    recipe = f"{RECIPE} {options.extra}".strip()
    name = f"emoji_style_shift_{options.tag}" if options.tag else "emoji_style_shift"
    if not (options.data / "metadata.jsonl").is_file():
        parser.error(f"--data {options.data} holds no metadata.jsonl (the emoji imagefolder).")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "emoji-styles"
        counts = build_splits(options.data, folder)
        xmodal = run_xmodal(folder, options.max_time, Path(scratch) / "xmodal", recipe)
        clip = run_clip(folder, options.max_time, name)
    rows = [
        [
            "xmodal (recipe)",
            xmodal["train_steps"],
            *_recalls(xmodal, "text_to_image"),
            *_recalls(xmodal, "image_to_text"),
        ],
        ["CLIPModel", clip["train_steps"], *_recalls(clip, "text_to_image"), *_recalls(clip, "image_to_text")],
    ]
    header = ["model", "steps", "t->i R@1", "R@5", "R@10", "i->t R@1", "R@5", "R@10"]
    info = machine()
    markdown = (
        f"Emoji in unseen styles: trained {options.max_time} on all {counts['train']} google emoji, scored on "
        f"{counts['test']} style-shifted copies (recall in %, among {counts['test']} names).\n\n"
        + markdown_table(header, rows)
        + f"\n\nxmodal recipe: `xmodal pretrain {recipe} --max_time {options.max_time}` (model selected on the "
        f"validation styles at step {xmodal['saved_model_step']} of {xmodal['train_steps']}).\n\n{machine_line(info)}\n"
    )
    payload = {
        "machine": info,
        "options": {"max_time": options.max_time, "recipe": recipe},
        "xmodal": {key: value for key, value in xmodal.items() if key.startswith("test_") or key.startswith("train_")},
        "clip": clip,
    }
    publish(name, payload, markdown)


if __name__ == "__main__":
    main()
