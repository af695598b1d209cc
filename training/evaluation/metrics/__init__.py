"""Evaluation metrics as local `evaluate` metric modules, loadable offline.

Every metric is a folder `<name>/<name>.py` next to this file holding one `evaluate.Metric` subclass, so that
`evaluate.load(metric_path(name))` works without the Hugging Face Hub (evaluate's built-in metrics are fetched from
it). evaluate copies each module file alone into its cache, so the modules import only the standard library, numpy,
datasets and evaluate, never xmodal.

- `retrieval_recall`: Recall@K, mean and median rank of the true gallery item (one call per retrieval direction).
- `zero_shot_accuracy`: top-1 and top-5 accuracy from per-class scores.
- `vqa_accuracy`: VQA v2 accuracy against up to 10 human answers.
- `bleu`: corpus BLEU-4 with the closest-reference brevity penalty, optional add-one smoothing.
- `cider`: CIDEr-D as in coco-caption.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS: tuple[str, ...] = ("retrieval_recall", "zero_shot_accuracy", "vqa_accuracy", "bleu", "cider")

_METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Path of the folder of metric `name` (one of `METRICS`), for `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; accepted names: {', '.join(METRICS)}.")
    return str(_METRICS_DIR / name)


def load_metric(name: str, **kwargs: object) -> evaluate.EvaluationModule:
    """Load metric `name` (one of `METRICS`) offline; `kwargs` go to `evaluate.load` (e.g. `experiment_id`,
    `keep_in_memory`, `num_process`/`process_id` for distributed evaluation)."""
    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "load_metric", "metric_path"]
