"""Experiment trackers (`--report_to`): the names Accelerate's trackers and the Trainer's integrations both accept,
checked before a run starts.

Accelerate skips a requested tracker whose package is missing with only a debug message, so `--report_to
tensorboard` without `tensorboard` installed would train for hours and log nothing; here it is an error that names
the package to install.
"""

from __future__ import annotations

import json
from typing import Any

from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

# the package that provides each tracker (what `pip install` needs)
_PACKAGES = {
    "aim": "aim",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}


def parse_report_to(value: str) -> list[str]:
    """`--report_to` as a list of tracker names: `"none"` -> `[]`, `"all"` -> every installed tracker,
    `"tensorboard,wandb"` -> those two.

    Raises:
        ValueError: a name that is not a tracker (the message lists the accepted ones), `none` or `all` mixed with
            other names, or a tracker whose package is not installed (the message gives the `pip install`).
    """
    names = [name.strip() for name in str(value).split(",") if name.strip()]
    accepted = sorted(name for name in LoggerType.list() if name != "all")
    if not names:
        raise ValueError(f"--report_to is empty; give none, all or trackers among {', '.join(accepted)}.")
    installed = sorted(tracker.value for tracker in get_available_trackers())
    if names == ["none"]:
        return []
    if names == ["all"]:
        return installed
    unknown = [name for name in names if name not in accepted]
    if unknown:
        special = " (none and all stand alone)" if set(unknown) & {"none", "all"} else ""
        raise ValueError(
            f"--report_to {value!r}: {', '.join(unknown)} is not a tracker{special}; accepted: none, all, or "
            f"comma-separated names among {', '.join(accepted)}."
        )
    missing = [name for name in names if name not in installed]
    if missing:
        packages = " ".join(_PACKAGES[name] for name in missing)
        raise ValueError(
            f"--report_to {value!r}: {', '.join(missing)} is not installed (pip install {packages}); installed "
            f"trackers: {', '.join(installed) or 'none'}."
        )
    return list(dict.fromkeys(names))


def tracker_config(options: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """A run's options as tracker hyperparameters: None dropped, lists, tuples and dicts as JSON text (TensorBoard's
    hparams take only int, float, str and bool; `crop_scale` is a pair)."""
    return {
        name: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for name, value in options.items()
        if value is not None
    }


__all__ = ["parse_report_to", "tracker_config"]
