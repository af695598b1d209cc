"""Evaluations during training and the choice of the model to keep (transformers' `eval_steps`,
`metric_for_best_model`, `greater_is_better`, `load_best_model_at_end`).

`--eval_steps N` evaluates the validation split every N optimizer steps; `--eval_steps 0.1` every tenth of the
budget (steps or `--max_time`, whichever the run is bounded by), as transformers reads a value below 1. Each
evaluation that improves `metric_for_best_model` saves the weights as the best model (`checkpoints/best/`); with
`load_best_model_at_end` the run ends by loading them, so the saved, evaluated and pushed model is the best one seen.
"""

from __future__ import annotations

import math
from typing import Any


def metric_value(results: dict[str, Any], metric: str) -> float:
    """`results[metric]` (an `eval_` prefix is accepted, as in transformers), as a float.

    Raises:
        ValueError: the evaluation has no such metric; the message lists those it has.
    """
    name = metric.removeprefix("eval_")
    if name not in results or not isinstance(results[name], (int, float)):
        accepted = sorted(key for key, value in results.items() if isinstance(value, (int, float)))
        raise ValueError(
            f"--metric_for_best_model {metric!r} is not a metric of the evaluation; accepted: {accepted}."
        )
    return float(results[name])


class ModelSelection:
    """When to evaluate during training, and whether an evaluation is the best so far.

    Args:
        eval_steps: 0 (never), a whole number of steps, or a share of the budget in (0, 1).
        metric: the metric that ranks the evaluations (None: evaluations are only logged).
        greater_is_better: whether a larger `metric` is better.

    The position (`next_progress`) and the best record (`best`: step, metric, value) live in the run's `state`
    dict, so they are saved with every checkpoint and a resumed run continues them.
    """

    def __init__(self, eval_steps: float, metric: str | None, greater_is_better: bool = True) -> None:
        self.eval_steps = eval_steps
        self.metric = metric
        self.greater_is_better = greater_is_better

    @staticmethod
    def initial_state() -> dict[str, Any]:
        return {"next_eval_progress": None, "best": None}

    def due(self, step: int, progress: float, state: dict[str, Any]) -> bool:
        """Whether to evaluate after optimizer step `step`, with `progress` in [0, 1] of the budget spent (updates
        `state` for a share-of-budget schedule)."""
        if not self.eval_steps:
            return False
        if self.eval_steps >= 1:
            return step % int(self.eval_steps) == 0
        if state["next_eval_progress"] is None:
            state["next_eval_progress"] = self.eval_steps
        if progress + 1e-9 < state["next_eval_progress"]:
            return False
        # the next mark after this progress (several marks may pass in one long step)
        state["next_eval_progress"] = (math.floor(progress / self.eval_steps + 1e-9) + 1) * self.eval_steps
        return True

    def improves(self, results: dict[str, Any], state: dict[str, Any]) -> bool:
        """Whether `results` beat the best evaluation so far (the first always does); no metric: never."""
        if self.metric is None:
            return False
        value = metric_value(results, self.metric)
        if math.isnan(value):
            return False
        best = state["best"]
        if best is None:
            return True
        return value > best["value"] if self.greater_is_better else value < best["value"]

    def record(self, step: int, results: dict[str, Any]) -> dict[str, Any]:
        """The best-model record of an evaluation at `step`."""
        return {"step": step, "metric": self.metric, "value": metric_value(results, self.metric)}


__all__ = ["ModelSelection", "metric_value"]
