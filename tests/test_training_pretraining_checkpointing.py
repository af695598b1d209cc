"""Checkpoints and resume: atomic checkpoints, a run killed with SIGKILL and resumed ends with the weights of an
uninterrupted run, non-finite losses are skipped and counted."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from xmodal.training import PretrainArguments, pretrain
from xmodal.training.pretraining.checkpointing import list_checkpoints

# multi-task (every objective, the momentum queue) so that resume must restore the RNG streams of masking, ITM
# negatives and question draws, and the queue buffers, not just the weights and the optimizer
RUN = {
    "preset": "tiny",
    "objectives": "all",
    "queue_size": 16,
    "num_train_examples": 48,
    "num_eval_examples": 16,
    "eval_batch_size": 16,
    "vocab_size": 128,
    "batch_size": 8,
    "max_steps": 10,
    "warmup_steps": 2,
    "save_steps": 3,
    "save_total_limit": 2,
    "config_overrides": json.dumps(
        {
            "vision_config": {"num_hidden_layers": 1, "image_size": 32},
            "text_config": {"num_hidden_layers": 1},
            "cross_config": {"num_hidden_layers": 1},
        }
    ),
}
_SCRIPT = (
    "import json, sys\n"
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "from xmodal.training import PretrainArguments, pretrain\n"
    "pretrain(PretrainArguments(**json.loads(sys.argv[1])))\n"
)


def _command(output_dir: str, **overrides: object) -> list[str]:
    return [sys.executable, "-c", _SCRIPT, json.dumps({**RUN, "output_dir": output_dir, **overrides})]


def _run(output_dir: str, **overrides: object) -> None:
    result = subprocess.run(_command(output_dir, **overrides), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    process = subprocess.Popen(_command(interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list_checkpoints(interrupted) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = list_checkpoints(interrupted)
    assert killed_at and not os.path.exists(os.path.join(interrupted, "model.safetensors"))

    # the uninterrupted run uses the tokenizer the interrupted one trained and saved (WordPiece training is not
    # reproducible across processes); the resumed run must load it by itself
    _run(reference, tokenizer=os.path.join(interrupted, "checkpoints", "tokenizer"))
    _run(interrupted, resume=True)
    ours, theirs = load_file(f"{interrupted}/model.safetensors"), load_file(f"{reference}/model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    ours_metrics = json.load(open(f"{interrupted}/metrics.json"))
    theirs_metrics = json.load(open(f"{reference}/metrics.json"))
    assert ours_metrics["resumed_from"] == killed_at[-1] or ours_metrics["resumed_from"] in killed_at
    assert ours_metrics["losses"] == pytest.approx(theirs_metrics["losses"], abs=1e-6)
    # checkpoints every 3 steps and one at the end, the newest two kept, no temporary folders
    assert [os.path.basename(p) for p in list_checkpoints(interrupted)] == ["step-000009", "step-000010"]
    assert not [name for name in os.listdir(f"{interrupted}/checkpoints") if name.startswith("tmp-")]


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    output_dir = str(tmp_path / "run")
    _run(output_dir, max_steps=3)
    # what a kill during the next save leaves behind: a partial temporary folder
    partial = tmp_path / "run" / "checkpoints" / "tmp-step-000006"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    _run(output_dir, max_steps=6, resume=True)
    assert [os.path.basename(p) for p in list_checkpoints(output_dir)] == ["step-000003", "step-000006"]
    assert not partial.exists()
    assert json.load(open(f"{output_dir}/metrics.json"))["resumed_from"].endswith("step-000003")


def test_a_fresh_run_refuses_to_overwrite_checkpoints(tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    with pytest.raises(ValueError, match="--resume"):
        pretrain(PretrainArguments(**{**RUN, "output_dir": str(output_dir)}))


def test_nonfinite_losses_are_skipped_and_too_many_stop_the_run(tmp_path, monkeypatch):
    pretrain_module = importlib.import_module("xmodal.training.pretraining.loop")
    calls = {"count": 0}
    collate = pretrain_module.ImageTextCollator.__call__

    def corrupting_collate(self, rows):
        batch = collate(self, rows)
        calls["count"] += 1
        if calls["count"] in (2, 3) or calls["count"] >= 6:
            batch["pixel_values"][0, 0, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(pretrain_module.ImageTextCollator, "__call__", corrupting_collate)
    args = {**RUN, "objectives": "contrastive", "queue_size": 0, "save_steps": 2, "max_nonfinite_steps": 3}
    with pytest.raises(RuntimeError, match=r"3 consecutive steps.*step 4.*step-000002"):
        pretrain(PretrainArguments(**{**args, "output_dir": str(tmp_path / "run")}))

    calls["count"] = 0
    monkeypatch.setattr(
        pretrain_module.ImageTextCollator,
        "__call__",
        lambda self, rows: corrupting_collate(self, rows) if calls["count"] < 4 else collate(self, rows),
    )
    metrics = pretrain(PretrainArguments(**{**args, "output_dir": str(tmp_path / "ok"), "max_steps": 4}))
    assert metrics["nonfinite_steps"] == 2 and metrics["train_steps"] == 4
    assert all(loss == loss for loss in metrics["losses"])
