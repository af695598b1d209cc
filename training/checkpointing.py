"""Atomic training checkpoints with Accelerate.

A checkpoint is a folder `checkpoints/step-000100/` holding what `Accelerator.save_state` writes (model weights as
safetensors, optimizer, scheduler, every process's RNG states) plus `training_state.json` (step, epoch position, loss
curves, counters). It is written under a temporary name and renamed into place once complete, so the folder always
holds whole checkpoints: a run killed while saving leaves the previous checkpoint intact and an incomplete
`tmp-step-*` folder that the next run deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "training_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    """The folder that holds a run's checkpoints."""
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    steps = sorted(int(match.group(1)) for name in os.listdir(root) if (match := _NAME.match(name)))
    return [os.path.join(root, f"step-{step:06d}") for step in steps]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _fsync_tree(path: str) -> None:
    """Flushes every file of a folder (and the folder entries) to disk before the rename publishes it."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def remove_incomplete_checkpoints(output_dir: str) -> None:
    """Deletes `tmp-step-*` folders left by a run killed while saving."""
    root = checkpoint_root(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("tmp-step-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, state: dict[str, Any], save_total_limit: int | None
) -> str:
    """Saves the Accelerate state and `state` (JSON) as checkpoint `step`, atomically, then keeps only the newest
    `save_total_limit` checkpoints. Every process must call it (each writes its own RNG state).

    Returns:
        The path of the new checkpoint.
    """
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{step:06d}")
    temporary = os.path.join(root, f"tmp-step-{step:06d}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(temporary)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise OSError(
            f"Writing checkpoint {final} failed ({err}); the previous checkpoint "
            f"{latest_checkpoint(output_dir) or '(none)'} is intact."
        ) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temporary, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump({"step": step, **state}, handle)
        _fsync_tree(temporary)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str) -> dict[str, Any]:
    """Restores the Accelerate state of a checkpoint (model, optimizer, scheduler, RNG states) and returns its
    training state."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{path} is not a complete xmodal checkpoint: {STATE_FILE} is missing.")
    accelerator.load_state(path)
    with open(state_file, encoding="utf-8") as handle:
        return json.load(handle)


__all__ = [
    "CHECKPOINTS_DIR",
    "STATE_FILE",
    "checkpoint_root",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_incomplete_checkpoints",
    "save_checkpoint",
]
