"""The training budget (optimizer steps, wall-clock time or both) and the learning-rate schedule fitted to it.

`--max_time 8m` (Lightning's option, any of `90`, `90s`, `8m`, `1h30m`, `00:08:00`, `00:00:08:00`) ends a run when
the next step would pass the budget; the cosine decay runs over the *progress* through the budget, the larger of
`step / max_steps` and `seconds / max_seconds`, so the learning rate reaches 0 when the budget is spent, whichever
limit ends the run. With a step budget only, the schedule is transformers' `get_cosine_schedule_with_warmup`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

_CLOCK = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")
_UNITS = re.compile(r"(\d+(?:\.\d*)?)\s*([dhms])", re.IGNORECASE)
_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: str | float | int) -> float:
    """Seconds of a wall-clock budget: a number of seconds (`90`, `"90"`), units (`"90s"`, `"8m"`, `"1h30m"`,
    `"1d2h"`) or a clock (`"MM:SS"`, `"HH:MM:SS"`, Lightning's `"DD:HH:MM:SS"`).

    Raises:
        ValueError: the value is none of these, or not positive.
    """
    text = str(value).strip()
    seconds: float | None = None
    try:
        seconds = float(text)
    except ValueError:
        if (clock := _CLOCK.match(text)) is not None:
            # MM:SS, HH:MM:SS or DD:HH:MM:SS: the fields fill from the right
            fields = [float(part) for part in clock.groups() if part is not None]
            seconds = sum(part * unit for part, unit in zip(reversed(fields), (1, 60, 3600, 86400)))
        elif _UNITS.sub("", text).strip() == "" and _UNITS.search(text):
            seconds = sum(float(number) * _SECONDS[unit.lower()] for number, unit in _UNITS.findall(text))
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"--max_time {value!r} is not a positive duration; accepted: seconds (90), units (90s, 8m, 1h30m) or a "
            "clock (08:00, 00:08:00, 00:00:08:00)."
        )
    return seconds


class BudgetedSchedule:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 over the rest of the training budget.

    `progress(step, seconds)` is the share of the budget spent, `max(step / max_steps, seconds / max_seconds)` over
    the limits that are set. After warmup the learning rate is `peak * 0.5 * (1 + cos(pi * q))` with
    `q = (p - p0) / (1 - p0)`, where `p0` is the progress at the end of warmup: with steps only this is exactly
    transformers' `get_cosine_schedule_with_warmup`. The state (`state_dict`) is what a resumed run needs.

    Args:
        optimizer: its groups' current `lr` are the peaks.
        warmup_steps: steps of linear warmup from 0.
        max_steps: step budget, or None.
        max_seconds: wall-clock budget in seconds, or None (at least one limit is required).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        max_steps: int | None,
        max_seconds: float | None = None,
    ) -> None:
        if max_steps is None and max_seconds is None:
            raise ValueError("BudgetedSchedule needs max_steps, max_seconds or both.")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.warmup_end_progress: float | None = 0.0 if warmup_steps == 0 else None
        self.last_factor = 0.0
        self._apply(self.factor(0, 0.0))

    def progress(self, step: int, seconds: float) -> float:
        """The share in `[0, 1]` of the budget spent after `step` steps and `seconds` of training."""
        shares = []
        if self.max_steps is not None:
            shares.append(step / self.max_steps)
        if self.max_seconds is not None:
            shares.append(seconds / self.max_seconds)
        return min(1.0, max(shares))

    def factor(self, step: int, seconds: float) -> float:
        """The learning-rate multiplier for the next step, after `step` steps and `seconds` of training."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.warmup_end_progress is None:
            if self.max_seconds is None:
                self.warmup_end_progress = self.warmup_steps / self.max_steps
            else:
                self.warmup_end_progress = self.progress(step, seconds)
        start = self.warmup_end_progress
        decayed = (self.progress(step, seconds) - start) / (1.0 - start) if start < 1.0 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, decayed))))

    def _apply(self, factor: float) -> None:
        self.last_factor = factor
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self, step: int, seconds: float) -> None:
        """Sets the learning rate of the next step, after `step` optimizer steps and `seconds` of training."""
        self._apply(self.factor(step, seconds))

    def get_last_lr(self) -> list[float]:
        return [base * self.last_factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_end_progress": self.warmup_end_progress, "last_factor": self.last_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warmup_end_progress = state["warmup_end_progress"]
        self._apply(state["last_factor"])


__all__ = ["BudgetedSchedule", "parse_duration"]
