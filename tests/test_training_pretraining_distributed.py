"""Several processes train exactly like one: `accelerate launch` with 2 CPU processes (gloo) and a per-process batch
of B ends with the losses and weights of one process with batch 2B (global-batch InfoNCE, split batches)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xmodal.training import PretrainArguments, pretrain

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))
RUN = {
    "preset": "tiny",
    "objectives": "contrastive",
    "num_train_examples": 64,
    "num_eval_examples": 16,
    "eval_batch_size": 16,
    "vocab_size": 128,
    "max_steps": 6,
    "warmup_steps": 1,
    "learning_rate": 1e-3,
    # Known gap (issue 16): the augmentation and caption draws are seeded per collated batch, and each process
    # collates its own half, so with them on two processes draw differently from one; this test checks the
    # distributed loss and gradients on the deterministic inputs.
    "augment": False,
    "text_column": "text",
    # The weights of 1 and 2 processes are compared after AdamW, which turns float-rounding differences in
    # (near-)zero gradients into steps of up to lr. The CLIP tower style has such parameters by construction (zero
    # biases of the attention keys, whose gradient softmax cancels; rarely used embedding rows) and its weights then
    # differ by up to ~1e-4 depending on the thread count; the BERT style's do not, so the test pins it.
    "tower_style": "bert",
    "config_overrides": json.dumps(
        {
            "vision_config": {"num_hidden_layers": 1, "image_size": 32},
            "text_config": {"num_hidden_layers": 1},
            "cross_config": {"num_hidden_layers": 1},
        }
    ),
}
_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from xmodal.training import PretrainArguments, pretrain
pretrain(PretrainArguments(**json.loads(sys.argv[1])))
"""


@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate launcher is not installed next to this Python")
@pytest.mark.parametrize(
    "objective",
    [{}, {"queue_size": 32}],
    ids=["global_infonce", "momentum_queue_of_the_global_batch"],
)
def test_two_processes_train_like_one_process_with_the_combined_batch(tmp_path, objective):
    single, double = tmp_path / "single", tmp_path / "double"
    run = {**RUN, **objective}
    # one tokenizer for both runs (WordPiece training is not reproducible across processes)
    metrics = pretrain(PretrainArguments(**{**run, "output_dir": str(single), "batch_size": 16, "save_steps": 6}))
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    arguments = {
        **run,
        "output_dir": str(double),
        "batch_size": 8,
        "tokenizer": str(single / "checkpoints" / "tokenizer"),
    }
    # --multi_gpu is Accelerate's multi-process launcher; on a CPU-only machine the processes form a gloo group
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script), json.dumps(arguments)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    theirs = json.loads((double / "metrics.json").read_text())
    assert theirs["train_pairs"] == metrics["train_pairs"] == 6 * 16
    assert theirs["losses"] == pytest.approx(metrics["losses"], abs=1e-5)
    ours_weights, theirs_weights = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    for name, value in ours_weights.items():
        torch.testing.assert_close(theirs_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # evaluation is sharded over the two processes and gathered: the same figures
    for key in ("test_text_to_image_R@1", "test_image_to_text_mean_rank", "test_zero_shot_top1"):
        assert theirs[key] == pytest.approx(metrics[key], abs=1e-6), key


DDP_CONFIG = Path(__file__).resolve().parents[1] / "docs" / "accelerate" / "ddp.yaml"


def _launch_two(script: Path, arguments: dict) -> None:
    """`accelerate launch` of the pretraining script with the documented DDP config: 2 CPU processes (gloo) here."""
    command = [ACCELERATE, "launch", "--config_file", str(DDP_CONFIG), str(script), json.dumps(arguments)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate launcher is not installed next to this Python")
def test_a_two_process_run_resumes_from_its_checkpoint_like_an_uninterrupted_one(tmp_path):
    """2 processes with the momentum queue, a checkpoint at step 3 of 6: resumed on 2 processes from that checkpoint,
    the run ends with the uninterrupted run's losses and weights (model, queue and RNG states restored per process)."""
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    run = {
        **RUN,
        "queue_size": 32,
        "batch_size": 8,
        "save_steps": 3,
        "save_total_limit": 0,
        "tokenizer": str(Path(__file__).resolve().parents[1] / "training" / "assets" / "demo-tokenizer"),
    }
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _launch_two(script, {**run, "output_dir": str(full)})
    shutil.copytree(full, resumed)
    # what a crash after the step-3 checkpoint leaves: no later checkpoint, no final model
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    for name in ("model.safetensors", "metrics.json"):
        (resumed / name).unlink()
    _launch_two(script, {**run, "output_dir": str(resumed), "resume": True})

    ours, theirs = json.loads((full / "metrics.json").read_text()), json.loads((resumed / "metrics.json").read_text())
    assert theirs["resumed_from"].endswith("step-000003")
    # the checkpoint carries the losses of steps 1-3, the resumed processes add steps 4-6
    assert len(theirs["losses"]) == 6 and theirs["losses"] == pytest.approx(ours["losses"], abs=1e-6)
    full_weights, resumed_weights = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert full_weights.keys() == resumed_weights.keys()
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=1e-6, msg=name)


def test_the_documented_accelerate_configs_load():
    """docs/accelerate/*.yaml are valid Accelerate configs (the DDP one is launched above; FSDP and DeepSpeed need
    GPUs, and DeepSpeed its package, so only their parsing is checked on CPU)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    kinds = {
        name: load_config_from_file(str(DDP_CONFIG.parent / f"{name}.yaml"))
        for name in ("ddp", "fsdp", "deepspeed_zero2")
    }
    assert kinds["ddp"].distributed_type == DistributedType.MULTI_GPU
    assert kinds["fsdp"].distributed_type == DistributedType.FSDP
    assert kinds["fsdp"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "XModalEncoderLayer"
    assert kinds["deepspeed_zero2"].distributed_type == DistributedType.DEEPSPEED
