"""Objective ablation at equal wall-clock on the demo data (the embedded synthetic scenes).

Each variant runs `xmodal pretrain` with the demo's recipe and the same `--max_time` budget, changing only
`--objectives`: contrastive only, contrastive plus each other objective, and all of them. Every run selects its model
on the validation split (mean recall) and is evaluated on the same 1,000 held-out test scenes:

- retrieval: text->image and image->text Recall@1/5/10;
- zero-shot top-1 over the 6 shapes (the largest object's);
- ITM accuracy (balanced, matched vs random other caption) and against hard negatives (the most similar other
  caption of the batch by the contrastive embeddings) where the model trains ITM;
- VQA accuracy (first question of each scene) where it trains VQA;
- CIDEr-D of the generated captions where it trains captioning.

Each variant runs in its own process, one after the other (the budget is wall-clock: nothing else should run), once
per seed of `--seeds`: at this budget the seed moves R@1 by several points, so compare medians over seeds.

    python bench/ablation.py [--max_time 2m] [--variants contrastive all ...] [--seeds 0 1 2] [--tag name]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, markdown_table, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = str(ROOT / "training" / "assets" / "demo-tokenizer")
OTHER_OBJECTIVES = ("itm", "mlm", "mim", "captioning", "vqa")
VARIANTS = {
    "contrastive": "contrastive",
    **{f"+{name}": f"contrastive,{name}" for name in OTHER_OBJECTIVES},
    "all": "all",
}
# the demo's recipe (the Makefile's DEMO_RECIPE), less its budget, objectives, weights and task sampling
WIDTH = {"hidden_size": 128, "intermediate_size": 512}
DEMO_CONFIG = {
    "projection_dim": 128,
    "vision_config": {"image_size": 48, "patch_size": 16, **WIDTH},
    "text_config": WIDTH,
    "cross_config": WIDTH,
}
RECIPE = (
    f"--preset tiny --tower_style clip --config_overrides {shlex.quote(json.dumps(DEMO_CONFIG))} --batch_size 128"
    " --auxiliary_batch_size 32 --loss_balancing relative_scale --eval_steps 0.2 --load_best_model_at_end"
)
# the demo's task sampling, for the variants with objectives besides the contrastive one
TASK_SAMPLING = ["--auxiliary_every", "4", "--auxiliary_start", "0.3"]
DEMO_WEIGHTS = {"itm": 0.1, "mlm": 0.1, "mim": 0.1, "captioning": 0.25, "vqa": 0.5}


def loss_weights(objectives: str) -> str:
    """The demo's `--loss_weights` restricted to a variant's objectives."""
    names = OTHER_OBJECTIVES if objectives == "all" else objectives.split(",")
    return ",".join(f"{name}={DEMO_WEIGHTS[name]}" for name in names if name in DEMO_WEIGHTS)


def run_variant(objectives: str, max_time: str, recipe: str, seed: int, output_dir: Path) -> dict[str, Any]:
    """Trains one variant with `xmodal pretrain` and returns its metrics.json."""
    command = [
        str(Path(sys.executable).with_name("xmodal")),
        "pretrain",
        *shlex.split(recipe),
        "--seed",
        str(seed),
        "--objectives",
        objectives,
        *(["--loss_weights", loss_weights(objectives), *TASK_SAMPLING] if loss_weights(objectives) else []),
        "--max_time",
        max_time,
        "--tokenizer",
        DEMO_TOKENIZER,
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output_dir / "metrics.json").read_text())


def _percent(metrics: dict[str, Any], name: str) -> str:
    value = metrics.get(f"test_{name}")
    return "-" if value is None else f"{100 * value:.1f}"


def _row(name: str, metrics: dict[str, Any]) -> list[Any]:
    cider = metrics.get("test_captioning_cider")
    return [
        name,
        metrics["train_steps"],
        *(_percent(metrics, f"text_to_image_R@{k}") for k in (1, 5, 10)),
        *(_percent(metrics, f"image_to_text_R@{k}") for k in (1, 5, 10)),
        _percent(metrics, "zero_shot_top1"),
        _percent(metrics, "itm_accuracy"),
        _percent(metrics, "itm_hard_accuracy"),
        _percent(metrics, "vqa_accuracy"),
        "-" if cider is None else f"{cider:.2f}",
    ]


def _median_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the median over the runs that report it."""
    keys = {key for run in runs for key, value in run.items() if isinstance(value, (int, float))}
    return {key: statistics.median([run[key] for run in runs if key in run]) for key in sorted(keys)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_time", default="2m", help="Wall-clock training budget of each variant.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--recipe", default=RECIPE, help="The `xmodal pretrain` options shared by every variant.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="One run of every variant per seed.")
    parser.add_argument("--tag", default="", help="Suffix of the result file.")
    options = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in options.variants:
            for seed in options.seeds:
                metrics = run_variant(
                    VARIANTS[name], options.max_time, options.recipe, seed, Path(scratch) / f"{name}-{seed}"
                )
                run = f"{name}, seed {seed}"
                results[run] = {key: value for key, value in metrics.items() if key.startswith("test_")}
                results[run].update(train_steps=metrics["train_steps"], train_seconds=metrics["train_seconds"])
                print(run, _row(run, metrics), flush=True)
            if len(options.seeds) > 1:
                results[f"{name}, median"] = _median_metrics(
                    [results[f"{name}, seed {seed}"] for seed in options.seeds]
                )
    header = ["objectives", "steps", "t->i R@1", "R@5", "R@10", "i->t R@1", "R@5", "R@10", "zero-shot", "ITM acc",
              "ITM hard", "VQA acc", "CIDEr"]  # fmt: skip
    info = machine()
    markdown = (
        f"Objective ablation, {options.max_time} of training per variant on the synthetic scenes (recall and "
        "accuracy in %, 1,000 held-out test scenes; '-': the variant does not train that head).\n\n"
        + markdown_table(header, [_row(name, metrics) for name, metrics in results.items()])
        + f"\n\nRecipe: `xmodal pretrain {options.recipe} --max_time {options.max_time}`.\n\n{machine_line(info)}\n"
    )
    payload = {"machine": info, "options": vars(options), "results": results}
    publish(f"ablation{'_' + options.tag if options.tag else ''}", payload, markdown)


if __name__ == "__main__":
    main()
