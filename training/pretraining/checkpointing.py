"""Atomic training checkpoints with Accelerate.

A checkpoint is a folder `checkpoints/step-000100/` holding what `Accelerator.save_state` writes (model weights as
safetensors, optimizer, scheduler, every process's RNG states) plus `training_state.json` (step, epoch position, loss
curves, counters). It is written under a temporary name and renamed into place once complete, so the folder always
holds whole checkpoints: a run killed while saving leaves the previous checkpoint intact and an incomplete
`tmp-step-*` folder that the next run deletes. Old checkpoints are renamed to a `tmp-step-*` name before they are
deleted, so a kill during the deletion never leaves a half-deleted `step-*` folder either.

A write that fails (a full disk, a quota, a file-size limit) removes its incomplete copy and raises an `OSError` that
says what happened and which checkpoint is intact, on every process at once (no process is left waiting for the
others in a collective operation).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_model, save_model

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


def _fsync_folder(path: str) -> None:
    """Flushes a folder's entries (a rename into it, a deletion) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: str) -> None:
    """Flushes every file of a folder (and the folder entries) to disk before the rename publishes it."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_folder(folder)


def _discard(path: str) -> None:
    """Deletes a checkpoint folder atomically as far as the listing goes: renamed to a `tmp-step-*` name first (which
    `remove_incomplete_checkpoints` cleans up if a kill interrupts the deletion), then removed."""
    if not os.path.exists(path):
        return
    doomed = os.path.join(os.path.dirname(path), f"tmp-{os.path.basename(path)}-deleted")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, files in os.walk(path) for name in files)


def describe_write_failure(error: BaseException, free_bytes: int, needed_bytes: int) -> str:
    """Why a checkpoint could not be written, for the error message: a full disk, a quota or a file-size limit when
    the error says so (`OSError` errno, or the text of safetensors' `SafetensorError`), else a full disk when less
    than `needed_bytes` (the size of the previous checkpoint, at least 1 MiB) are free (torch.save only reports
    `RuntimeError: ... unexpected pos ...` on a full disk); an empty string otherwise."""
    code, text = getattr(error, "errno", None), str(error)
    if code == errno.ENOSPC or "No space left on device" in text:
        return "the disk is full (No space left on device)"
    if code == errno.EDQUOT or "Disk quota exceeded" in text:
        return "the disk quota is exceeded"
    if code == errno.EFBIG or "File too large" in text:
        return "a file-size limit was reached (File too large)"
    if free_bytes < max(needed_bytes, 1 << 20):
        return f"the disk is probably full ({free_bytes / 2**20:.1f} MiB free)"
    return ""


def _write_error(error: BaseException | None, final: str, output_dir: str, previous: str | None) -> OSError:
    """The error every process raises when writing checkpoint `final` failed (`error`: this process's own failure,
    None when another process failed)."""
    root = checkpoint_root(output_dir)
    free = shutil.disk_usage(root if os.path.isdir(root) else output_dir).free
    intact = (
        f"the previous checkpoint {previous} is intact: continue from it with --resume"
        if previous
        else "no earlier checkpoint exists"
    )
    if error is None:
        return OSError(f"Writing checkpoint {final} failed on another process (see its error); {intact}.")
    reason = describe_write_failure(error, free, _folder_size(previous) if previous else 0)
    advice = " once space is freed" if reason and previous else ""
    return OSError(
        f"Writing checkpoint {final} failed: {reason + ': ' if reason else ''}{type(error).__name__}: {error}. "
        f"Its incomplete copy was removed ({free / 2**20:.1f} MiB free on the disk of {root}); {intact}{advice}."
    )


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` holds on any process (a collective: every process must call it)."""
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def remove_incomplete_checkpoints(output_dir: str) -> None:
    """Deletes `tmp-step-*` (and `tmp-best`) folders left by a run killed while saving."""
    root = checkpoint_root(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(("tmp-step-", f"tmp-{BEST_DIR}")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, state: dict[str, Any], save_total_limit: int | None
) -> str:
    """Saves the Accelerate state and `state` (JSON) as checkpoint `step`, atomically, then keeps only the newest
    `save_total_limit` checkpoints. Every process must call it (each writes its own RNG state).

    Returns:
        The path of the new checkpoint.

    Raises:
        OSError: on every process, when any process could not write its part (a full disk, a quota, a file-size
            limit, ...); the message says why and which checkpoint is intact, and the incomplete copy is removed.
    """
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{step:06d}")
    temporary = os.path.join(root, f"tmp-step-{step:06d}")
    previous = latest_checkpoint(output_dir)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()

    def write_state_file() -> None:
        if accelerator.is_main_process:
            with open(os.path.join(temporary, STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump({"step": step, **state}, handle)
            _fsync_tree(temporary)

    # every process writes its part, then the main process completes and flushes the folder once all are done
    failure: BaseException | None
    for write in (lambda: accelerator.save_state(temporary), write_state_file):
        failure = None
        try:
            write()
        # safetensors raises SafetensorError, torch.save a RuntimeError, open and fsync an OSError: all mean the same
        except Exception as error:
            failure = error
        # a collective: every process learns of a failure on any of them, so that none waits for the others in vain
        if _any_process(accelerator, failure is not None):
            if accelerator.is_main_process:
                shutil.rmtree(temporary, ignore_errors=True)
            raise _write_error(failure, final, output_dir, previous) from failure
    if accelerator.is_main_process:
        _discard(final)
        os.replace(temporary, final)
        _fsync_folder(root)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                _discard(old)
    accelerator.wait_for_everyone()
    return final


BEST_DIR = "best"
BEST_WEIGHTS = "model.safetensors"
BEST_RECORD = "best.json"


def best_model_path(output_dir: str) -> str:
    """The folder of the best model seen by the validation evaluations (`--load_best_model_at_end`)."""
    return os.path.join(checkpoint_root(output_dir), BEST_DIR)


def save_best_model(accelerator: Accelerator, model: torch.nn.Module, output_dir: str, record: dict[str, Any]) -> str:
    """Saves the weights of `model` (unwrapped, shared tensors once) and `record` (step, metric, value) as the best
    model, atomically: written to `tmp-best`, flushed, then renamed over `best`, so the folder always holds one
    whole best model. Every process must call it (the main process writes).

    Raises:
        OSError: on every process when the write failed; the previous best model is kept.
    """
    final = best_model_path(output_dir)
    temporary = os.path.join(checkpoint_root(output_dir), f"tmp-{BEST_DIR}")
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(temporary)
            save_model(accelerator.unwrap_model(model), os.path.join(temporary, BEST_WEIGHTS))
            with open(os.path.join(temporary, BEST_RECORD), "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            _fsync_tree(temporary)
        except Exception as error:
            failure = error
    if _any_process(accelerator, failure is not None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        kept = f"the previous best model {final} is kept" if os.path.isdir(final) else "no best model was saved"
        raise OSError(
            f"Writing the best model to {final} failed"
            + (f": {type(failure).__name__}: {failure}" if failure is not None else " on another process")
            + f"; {kept}."
        ) from failure
    if accelerator.is_main_process:
        _discard(final)
        os.replace(temporary, final)
        _fsync_folder(checkpoint_root(output_dir))
    accelerator.wait_for_everyone()
    return final


def load_best_model(model: torch.nn.Module, output_dir: str) -> dict[str, Any]:
    """Loads the best model's weights into `model` (in place) and returns its record."""
    path = best_model_path(output_dir)
    if not os.path.isfile(os.path.join(path, BEST_RECORD)):
        raise FileNotFoundError(f"{path} holds no complete best model ({BEST_RECORD} is missing).")
    load_model(model, os.path.join(path, BEST_WEIGHTS))
    with open(os.path.join(path, BEST_RECORD), encoding="utf-8") as handle:
        return json.load(handle)


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
    "BEST_DIR",
    "CHECKPOINTS_DIR",
    "STATE_FILE",
    "best_model_path",
    "checkpoint_root",
    "describe_write_failure",
    "latest_checkpoint",
    "list_checkpoints",
    "load_best_model",
    "load_checkpoint",
    "remove_incomplete_checkpoints",
    "save_best_model",
    "save_checkpoint",
]
