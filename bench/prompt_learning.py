"""Learned prompts (CoOp) vs hand-written prompts, with K labelled images per class.

For each dataset a tiny xmodal model is pretrained contrastively here (or loaded with --<dataset>_model DIR). On
held-out test images, its accuracy is measured for each task

- with hand-written prompts: each template set below, a class embedded as the mean of its prompts (CLIP's
  ensembling); the best set on the test images is reported (an optimistic baseline: chosen on the test set);
- with learned prompts (`xmodal.training.transfer.prompt_learning.train_prompts`), shared and class-specific context,
  trained on K images per class drawn from the training images, for each K and --seeds draws (median reported);
- as a reference that uses no text, with the class means of the same K shots' image embeddings (nearest class
  mean): when it is at chance the image embeddings do not carry the classes, and no prompt can help.

Datasets and tasks:

- synthetic: the embedded procedural scenes, pretrained on --num_train_examples scenes (seed 0); the shots and the
  test images are fresh scenes (another seed). Tasks: `shape`, the `label` column (the largest object's shape, 6
  classes), and `colour`, the largest object's colour (8 classes, from the `scene` column).
- emoji: ../shared/data/emoji-google, pretrained on the `emoji_split == "train"` rows with their `name` as caption;
  shots drawn from those rows, tested on the "test" rows. Task: `category` (9 classes).

    python bench/prompt_learning.py [--datasets synthetic emoji] [--pretrain_steps 120] [--shots 1 2 4 8] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EMOJI, RESULTS_DIR, machine, median  # noqa: E402

from xmodal import XModalModel, XModalProcessor  # noqa: E402
from xmodal.training import PretrainArguments, pretrain  # noqa: E402
from xmodal.training.data import COLORS, SHAPES, make_synthetic_dataset  # noqa: E402
from xmodal.training.data.pipeline import DataArguments, load_pretraining_data  # noqa: E402
from xmodal.training.inference.embeddings import embed_images
from xmodal.training.inference.zero_shot import DEFAULT_TEMPLATES, ensemble_text_embeddings
from xmodal.training.transfer.prompt_learning import train_prompts  # noqa: E402


@dataclass
class Task:
    """A classification of a dataset's images: the class names, the class of each pool and test image, and the
    hand-written prompt sets to compare with."""

    class_names: list[str]
    pool_labels: list[int]
    test_labels: list[int]
    templates: dict[str, tuple[str, ...]]


@dataclass
class FewShotData:
    """The few-shot pool (training images the shots are drawn from), the test images, and the tasks over them."""

    pool_images: list
    test_images: list
    tasks: dict[str, Task]


def _largest_colour(scene: str) -> int:
    return list(COLORS).index(json.loads(scene)["objects"][0]["color"])


def _synthetic(args: argparse.Namespace, image_size: int) -> FewShotData:
    scenes = make_synthetic_dataset(
        num_train=args.num_pool_examples,
        num_validation=0,
        num_test=args.num_test_examples,
        seed=12345,
        image_size=image_size,
    )
    pool, test = scenes["train"], scenes["test"]
    shape = Task(
        list(SHAPES),
        pool["label"],
        test["label"],
        {
            "a {}. / there is a {}. (pretraining's)": ("a {}.", "there is a {}."),
            "DEFAULT_TEMPLATES": DEFAULT_TEMPLATES,
        },
    )
    colour = Task(
        list(COLORS),
        [_largest_colour(scene) for scene in pool["scene"]],
        [_largest_colour(scene) for scene in test["scene"]],
        {
            "a {} shape. / there is a {} object.": ("a {} shape.", "there is a {} object."),
            "DEFAULT_TEMPLATES": DEFAULT_TEMPLATES,
        },
    )
    return FewShotData(pool["image"], test["image"], {"shape": shape, "colour": colour})


def _emoji(args: argparse.Namespace, image_size: int) -> FewShotData:
    data = load_pretraining_data(
        DataArguments(dataset=str(EMOJI), text_column="name", split_column="emoji_split", num_eval_examples=100_000),
        image_size,
    )
    pool = [row for row in data.train if row["_bad"] is None]
    test = [data.evaluation[index] for index in range(min(len(data.evaluation), args.num_test_examples))]
    class_names = sorted({row["category"] for row in pool})
    category = Task(
        class_names,
        [class_names.index(row["category"]) for row in pool],
        [class_names.index(row["category"]) for row in test],
        {"{}": ("{}",), "DEFAULT_TEMPLATES": DEFAULT_TEMPLATES},
    )
    return FewShotData([row["image"] for row in pool], [row["image"] for row in test], {"category": category})


@dataclass
class Dataset:
    """How to pretrain on a dataset and load its few-shot data."""

    pretrain_fields: dict[str, Any]
    load: Callable[[argparse.Namespace, int], FewShotData]


DATASETS: dict[str, Dataset] = {
    "synthetic": Dataset(pretrain_fields={}, load=_synthetic),
    "emoji": Dataset(
        pretrain_fields={
            "dataset": str(EMOJI),
            "text_column": "name",
            "split_column": "emoji_split",
            "zero_shot_label_column": "category",
        },
        load=_emoji,
    ),
}


def _test_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Pretraining's own evaluation (retrieval and zero-shot on its held-out rows) from its metrics."""
    return {key: metrics[key] for key in sorted(metrics) if key.startswith("test_") and "examples" not in key}


def pretrained_model(name: str, args: argparse.Namespace) -> tuple[XModalModel, XModalProcessor, dict[str, Any]]:
    """The model given with --<name>_model (with its metrics.json's evaluation, if any), else one pretrained
    contrastively here; and how it was made."""
    folder = getattr(args, f"{name}_model")
    if folder is not None:
        metrics_file = Path(folder) / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        info = {"source": folder, **_test_metrics(metrics)}
    else:
        folder = str(Path(args.work_dir) / name)
        fields = {
            "output_dir": folder,
            "objectives": "contrastive",
            "max_steps": args.pretrain_steps,
            "batch_size": args.batch_size,
            "warmup_steps": max(1, args.pretrain_steps // 10),
            "num_train_examples": args.num_train_examples,
            "num_eval_examples": args.num_eval_examples,
            "eval_batch_size": args.num_eval_examples,
            "overwrite_output_dir": True,
            "config_overrides": args.config_overrides,
            **DATASETS[name].pretrain_fields,
        }
        start = time.perf_counter()
        metrics = pretrain(PretrainArguments(**fields))
        info = {
            "source": "pretrained by this script (contrastive only)",
            "pretrain_steps": args.pretrain_steps,
            "batch_size": args.batch_size,
            "pretrain_seconds": round(time.perf_counter() - start, 1),
            **_test_metrics(metrics),
        }
    return XModalModel.from_pretrained(folder).eval(), XModalProcessor.from_pretrained(folder), info


def few_shot_indices(labels: torch.Tensor, shots: int, num_classes: int, seed: int) -> torch.Tensor:
    """`shots` random indices of each class (all of a class's examples when it has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for index in range(num_classes):
        members = torch.nonzero(labels == index).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen)


def accuracy(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of the nearest class embedding (the logit scale and bias do not change the argmax)."""
    return (image_embeds @ class_embeds.t()).argmax(dim=1).eq(labels).float().mean().item()


def _summary(accuracies: list[float]) -> dict[str, Any]:
    return {"accuracies": [round(value, 4) for value in accuracies], "median_accuracy": round(median(accuracies), 4)}


def run_task(
    model: XModalModel,
    processor: XModalProcessor,
    task: Task,
    pool_embeds: torch.Tensor,
    test_embeds: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Hand-written prompts, learned prompts (shared and class-specific) and, as a text-free reference, the class
    means of the same shots' image embeddings (nearest class mean)."""
    pool_labels, test_labels = torch.tensor(task.pool_labels), torch.tensor(task.test_labels)
    num_classes = len(task.class_names)
    templates = {
        label: round(
            accuracy(test_embeds, ensemble_text_embeddings(model, processor, task.class_names, prompts), test_labels),
            4,
        )
        for label, prompts in task.templates.items()
    }
    best = max(templates, key=templates.get)
    print(f"  hand-written prompts: {templates}")
    few_shot = []
    for shots in args.shots:
        draws = [few_shot_indices(pool_labels, shots, num_classes, seed) for seed in range(args.seeds)]
        means = []
        for chosen in draws:
            labels = pool_labels[chosen]
            prototypes = torch.stack([pool_embeds[chosen][labels == index].mean(0) for index in range(num_classes)])
            means.append(accuracy(test_embeds, prototypes, test_labels))
        few_shot.append({"shots": shots, "method": "class means of the shots' image embeddings", **_summary(means)})
        for class_specific in (False, True):
            accuracies, seconds = [], []
            for seed, chosen in enumerate(draws):
                start = time.perf_counter()
                learner = train_prompts(
                    model,
                    processor,
                    None,
                    pool_labels[chosen].tolist(),
                    task.class_names,
                    image_embeds=pool_embeds[chosen],
                    num_context=args.num_context,
                    context_init=args.context_init,
                    class_specific=class_specific,
                    steps=args.prompt_steps,
                    learning_rate=args.prompt_learning_rate,
                    seed=seed,
                )
                seconds.append(time.perf_counter() - start)
                with torch.no_grad():
                    accuracies.append(accuracy(test_embeds, learner(model), test_labels))
            context = "class-specific" if class_specific else "shared"
            few_shot.append(
                {
                    "shots": shots,
                    "method": f"CoOp, {context} context",
                    **_summary(accuracies),
                    "median_train_seconds": round(median(seconds), 2),
                }
            )
    for row in few_shot:
        print(f"  K={row['shots']} {row['method']}: median {row['median_accuracy']:.3f} of {row['accuracies']}")
    return {
        "classes": task.class_names,
        "chance": round(1 / num_classes, 4),
        "hand_written": {"accuracy": templates[best], "best": best, "templates": templates},
        "few_shot": few_shot,
    }


def run_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, processor, model_info = pretrained_model(name, args)
    data = DATASETS[name].load(args, model.config.vision_config.image_size)
    pool_embeds = embed_images(model, processor, data.pool_images)
    test_embeds = embed_images(model, processor, data.test_images)
    tasks = {}
    for task_name, task in data.tasks.items():
        print(f"{name} / {task_name}:")
        tasks[task_name] = run_task(model, processor, task, pool_embeds, test_embeds, args)
    return {
        "model": model_info,
        "num_pool_images": len(data.pool_images),
        "num_test_images": len(data.test_images),
        "tasks": tasks,
    }


def markdown_table(result: dict[str, Any]) -> str:
    """One row per task and method, one column per K (hand-written prompts use no shot)."""
    shots = result["arguments"]["shots"]
    lines = [
        "| data: classes (test images) | method | " + " | ".join(f"K={k}" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for name, dataset in result["datasets"].items():
        for task_name, task in dataset["tasks"].items():
            where = f"{name}: {task_name}, {len(task['classes'])} classes ({dataset['num_test_images']})"
            hand = task["hand_written"]
            cells = [f"{hand['accuracy']:.3f}"] * len(shots)
            lines.append(f"| {where} | hand-written prompts ({hand['best']}), no shot | " + " | ".join(cells) + " |")
            methods = dict.fromkeys(row["method"] for row in task["few_shot"])
            for method in methods:
                cells = [
                    f"{row['median_accuracy']:.3f}"
                    for k in shots
                    for row in task["few_shot"]
                    if row["shots"] == k and row["method"] == method
                ]
                lines.append(f"| {where} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--pretrain_steps", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=64, help="Pretraining batch size.")
    parser.add_argument("--num_train_examples", type=int, default=4000, help="Procedural pretraining scenes.")
    parser.add_argument("--num_eval_examples", type=int, default=250, help="Pretraining's own evaluation rows.")
    parser.add_argument("--num_pool_examples", type=int, default=400, help="Procedural scenes to draw shots from.")
    parser.add_argument("--num_test_examples", type=int, default=600, help="Test images (at most, for emoji).")
    parser.add_argument("--config_overrides", default=None, help="JSON over the tiny preset (PretrainArguments).")
    parser.add_argument("--synthetic_model", default=None, help="Use this model folder instead of pretraining.")
    parser.add_argument("--emoji_model", default=None, help="Use this model folder instead of pretraining.")
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, default=5, help="Few-shot draws per K (median reported).")
    parser.add_argument("--num_context", type=int, default=None, help="Context vectors (default: the library's).")
    parser.add_argument("--context_init", default=None, help="Phrase initialising the context (default: random).")
    parser.add_argument("--prompt_steps", type=int, default=50)
    parser.add_argument("--prompt_learning_rate", type=float, default=5e-3)
    parser.add_argument("--work_dir", default="outputs/bench-prompt-learning", help="Where pretrained models go.")
    parser.add_argument("--output", default=str(RESULTS_DIR / "prompt_learning.json"))
    args = parser.parse_args(argv)
    if "emoji" in args.datasets and args.emoji_model is None and not EMOJI.is_dir():
        parser.error(f"the emoji set is not at {EMOJI}; leave it out with --datasets synthetic")

    start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "arguments": vars(args), "datasets": {}}
    for name in args.datasets:
        result["datasets"][name] = run_dataset(name, args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown_table(result))
    print(f"wrote {output} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
