"""Faults in training: a SIGKILL at any moment, also while a checkpoint is being written, leaves a complete and
loadable latest checkpoint (or none yet) and a run that resumes; a full disk keeps the previous checkpoint and says
so; a dataset whose images all fail stops with a clear error; a corrupted batch is skipped and counted; a process
that dies or hangs makes the others fail after `--ddp_timeout` instead of waiting forever.

Covered elsewhere: a share of undecodable images skipped and counted (test_training_pretraining_data.py), NaN pixels
skipped and too many consecutive ones stopping the run, and equal weights after one SIGKILL and resume
(test_training_pretraining_checkpointing.py; the slow test here checks the weights again after many kills)."""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import accelerate.utils.other
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xmodal.training import PretrainArguments, pretrain
from xmodal.training.pretraining.builders import _process_group_timeout
from xmodal.training.pretraining.checkpointing import (
    STATE_FILE,
    describe_write_failure,
    latest_checkpoint,
    list_checkpoints,
)

pretrain_module = importlib.import_module("xmodal.training.pretraining.loop")

_TOWER = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
TINY = json.dumps(
    {
        "vision_config": {**_TOWER, "image_size": 32},
        "text_config": _TOWER,
        "cross_config": _TOWER,
        "projection_dim": 32,
    }
)
RUN = {
    "preset": "tiny",
    "objectives": "contrastive",
    "num_train_examples": 32,
    "num_eval_examples": 8,
    "eval_batch_size": 8,
    "vocab_size": 64,
    "batch_size": 8,
    "max_steps": 6,
    "warmup_steps": 1,
    "save_steps": 2,
    "save_total_limit": 2,
    "config_overrides": TINY,
}
CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", STATE_FILE}

# The child run: `pretrain` with a SIGKILL of itself at a chosen moment of checkpoint writing (a real SIGKILL: no
# handler, no cleanup). It prints LOOP when the training loop starts, for kills after a random delay.
_CHILD = r"""
import importlib, io, json, os, re, shutil, signal, sys
import torch
torch.set_num_threads(1)
from xmodal.training import PretrainArguments, pretrain
from xmodal.training.pretraining.builders import _process_group_timeout
checkpointing = importlib.import_module("xmodal.training.pretraining.checkpointing")
pretrain_module = importlib.import_module("xmodal.training.pretraining.loop")
kill = json.loads(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

batches = pretrain_module._batches
def announcing_batches(*args, **kwargs):
    print("LOOP", flush=True)
    yield from batches(*args, **kwargs)
pretrain_module._batches = announcing_batches

if kill.get("at") == "file":  # half of one file of checkpoint `step` written
    save = torch.save
    def half_save(obj, path, *args, **kwargs):
        if f"tmp-step-{kill['step']:06d}" in str(path) and os.path.basename(path) == kill["file"]:
            buffer = io.BytesIO()
            save(obj, buffer)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        return save(obj, path, *args, **kwargs)
    torch.save = half_save
elif kill.get("at") == "publish":  # the run's first checkpoint written and flushed, not yet renamed into place
    fsync_tree = checkpointing._fsync_tree
    def fsync_then_die(path):
        fsync_tree(path)
        die()
    checkpointing._fsync_tree = fsync_then_die
elif kill.get("at") == "prune":  # the deletion of an old checkpoint begun: one of its files deleted
    rmtree = shutil.rmtree
    def partial_rmtree(path, *args, **kwargs):
        name = os.path.basename(str(path))
        deleting = re.fullmatch(r"(tmp-)?step-\d{6}-deleted|step-\d{6}", name)
        if deleting and os.path.isfile(os.path.join(path, "model.safetensors")):
            os.remove(os.path.join(path, "model.safetensors"))
            die()
        return rmtree(path, *args, **kwargs)
    shutil.rmtree = partial_rmtree
pretrain(PretrainArguments(**json.loads(sys.argv[1])))
"""


def _child(output_dir: Path, kill: dict[str, object] | None = None, **overrides: object) -> subprocess.Popen:
    """The child run; its stderr (progress bars, errors) goes to `<output_dir>.log`, so that a full pipe never
    blocks it while the test waits for a checkpoint."""
    arguments = json.dumps({**RUN, "output_dir": str(output_dir), **overrides})
    with open(f"{output_dir}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD, arguments, json.dumps(kill or {})],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )


def _finish(process: subprocess.Popen) -> str:
    """Waits for the child; returns the end of its stderr."""
    process.communicate(timeout=600)
    return Path(f"{json.loads(process.args[3])['output_dir']}.log").read_text()[-3000:]


def _assert_killed(process: subprocess.Popen) -> None:
    stderr = _finish(process)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed ({process.returncode}): {stderr}"


def _assert_checkpoints_complete(output_dir: Path) -> int:
    """Every published checkpoint holds all of its files, each readable to the end; returns the newest step (0 when
    there is none yet)."""
    checkpoints = list_checkpoints(str(output_dir))
    for path in map(Path, checkpoints):
        assert CHECKPOINT_FILES <= {item.name for item in path.iterdir()}, path
        state = json.loads((path / STATE_FILE).read_text())
        assert state["step"] == int(path.name.removeprefix("step-")) == len(state["losses"]), path
        weights = load_file(path / "model.safetensors")
        assert weights and all(torch.isfinite(value).all() for value in weights.values()), path
        assert torch.load(path / "optimizer.bin", weights_only=True)["state"], path
        for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl"):
            torch.load(path / name, weights_only=False)  # a truncated zip archive fails here
    return _newest_step(output_dir)


def _newest_step(output_dir: Path) -> int:
    latest = latest_checkpoint(str(output_dir))
    return int(Path(latest).name.removeprefix("step-")) if latest else 0


def _temporary_folders(output_dir: Path) -> list[str]:
    root = output_dir / "checkpoints"
    return sorted(name for name in os.listdir(root) if name.startswith("tmp-")) if root.is_dir() else []


# --- SIGKILL -----------------------------------------------------------------------------------------------------


def test_sigkill_while_a_checkpoint_file_is_half_written_then_resume(tmp_path):
    output_dir = tmp_path / "run"
    process = _child(output_dir, {"at": "file", "step": 4, "file": "optimizer.bin"})
    _assert_killed(process)
    # killed in the middle of the second checkpoint: its half-written copy is unpublished, the first is whole
    partial = output_dir / "checkpoints" / "tmp-step-000004" / "optimizer.bin"
    assert partial.is_file() and not (partial.parent / STATE_FILE).exists()
    with pytest.raises(RuntimeError):
        torch.load(partial, weights_only=True)
    assert _assert_checkpoints_complete(output_dir) == 2
    saved = json.loads((output_dir / "checkpoints" / "step-000002" / STATE_FILE).read_text())

    metrics = pretrain(PretrainArguments(**{**RUN, "output_dir": str(output_dir), "resume": True}))
    assert metrics["resumed_from"] == str(output_dir / "checkpoints" / "step-000002")
    assert metrics["train_steps"] == 6 and len(metrics["losses"]) == 6
    assert metrics["losses"][:2] == saved["losses"] and all(loss == loss for loss in metrics["losses"])
    assert [Path(path).name for path in list_checkpoints(str(output_dir))] == ["step-000004", "step-000006"]
    assert _assert_checkpoints_complete(output_dir) == 6 and _temporary_folders(output_dir) == []


@pytest.mark.slow
def test_many_sigkills_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Kills after seeded random delays in the training loop (checkpoints every step, so many land while one is
    being written), plus the two moments a delay rarely hits: a checkpoint complete but not yet renamed into place,
    and an old checkpoint half deleted. After each kill the folder holds only complete checkpoints, the newest never
    older than before; the run finally resumes to the weights of an uninterrupted run."""
    rng = random.Random(20240601)
    output_dir, reference = tmp_path / "killed", tmp_path / "reference"
    run = {"max_steps": 40, "save_steps": 1, "resume": True}
    plan: list[dict[str, object]] = [{"at": "delay"}, {"at": "publish"}, {"at": "delay"}, {"at": "delay"}]
    plan += [{"at": "prune"}, {"at": "delay"}]
    newest = 0
    for kill in plan:
        process = _child(output_dir, kill, **run)
        if kill["at"] == "delay":
            for line in process.stdout:  # after "Resuming from ..." when there is a checkpoint
                if line.strip() == "LOOP":
                    break
            else:
                pytest.fail(f"the run ended before its training loop: {_finish(process)}")
            # somewhere in the next three steps: during a step, or while its checkpoint is being written
            target = newest + rng.randint(0, 2)
            while _newest_step(output_dir) < target and process.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            process.send_signal(signal.SIGKILL)
        _assert_killed(process)
        step = _assert_checkpoints_complete(output_dir)
        assert step >= newest, f"{kill}: the newest checkpoint went back from step {newest} to {step}"
        if kill["at"] == "publish":
            assert step == newest and (output_dir / "checkpoints" / f"tmp-step-{step + 1:06d}" / STATE_FILE).is_file()
        if kill["at"] == "prune":
            assert [name for name in _temporary_folders(output_dir) if name.endswith("-deleted")], kill
        newest = step
    assert 0 < newest < 40, f"the kills left the newest checkpoint at step {newest}: no resume was tested"

    finished = _child(output_dir, **run)
    stderr = _finish(finished)
    assert finished.returncode == 0, stderr
    assert _temporary_folders(output_dir) == []
    # the uninterrupted run uses the tokenizer of the killed ones (WordPiece training is not reproducible)
    tokenizer = str(output_dir / "checkpoints" / "tokenizer")
    uninterrupted = _child(reference, max_steps=40, save_steps=0, tokenizer=tokenizer)
    stderr = _finish(uninterrupted)
    assert uninterrupted.returncode == 0, stderr
    ours, theirs = load_file(output_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    ours_metrics = json.loads((output_dir / "metrics.json").read_text())
    theirs_metrics = json.loads((reference / "metrics.json").read_text())
    assert ours_metrics["losses"] == pytest.approx(theirs_metrics["losses"], abs=1e-6)


# --- a full disk -------------------------------------------------------------------------------------------------


def test_a_file_size_limit_hit_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """The weights of the second checkpoint hit a real file-size limit of the operating system (RLIMIT_FSIZE: the
    write fails with EFBIG, as it fails with ENOSPC on a full disk), set only while safetensors writes them."""
    output_dir = tmp_path / "run"
    save_file = accelerate.utils.other.safe_save_file

    def limited_save_file(tensors, filename, metadata=None):
        if "tmp-step-000004" not in str(filename):
            return save_file(tensors, filename, metadata=metadata)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            return save_file(tensors, filename, metadata=metadata)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    with monkeypatch.context() as patch:
        patch.setattr(accelerate.utils.other, "safe_save_file", limited_save_file)
        with pytest.raises(OSError) as error:
            pretrain(PretrainArguments(**{**RUN, "output_dir": str(output_dir)}))
    message = str(error.value)
    assert "Writing checkpoint " + str(output_dir / "checkpoints" / "step-000004") + " failed" in message
    assert "a file-size limit was reached (File too large)" in message and "SafetensorError" in message
    assert f"the previous checkpoint {output_dir / 'checkpoints' / 'step-000002'} is intact" in message
    assert "--resume" in message
    assert _temporary_folders(output_dir) == [] and _assert_checkpoints_complete(output_dir) == 2

    metrics = pretrain(PretrainArguments(**{**RUN, "output_dir": str(output_dir), "resume": True}))
    assert metrics["resumed_from"].endswith("step-000002") and metrics["train_steps"] == 6


@pytest.mark.parametrize(
    ("error", "free", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 0, "the disk is full"),
        # safetensors' SafetensorError carries only the text
        (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 0, "disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 1 << 30, "the disk quota is exceeded"),
        (OSError(errno.EFBIG, "File too large"), 1 << 30, "a file-size limit was reached"),
        # torch.save says nothing of the cause: the free space tells
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 4096, "probably full"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 1 << 30, ""),
    ],
)
def test_write_failures_are_explained(error, free, expected):
    reason = describe_write_failure(error, free_bytes=free, needed_bytes=2 << 20)
    assert expected in reason if expected else reason == ""


# --- bad data ----------------------------------------------------------------------------------------------------


def _imagefolder(root: Path, bad_splits: set[str]) -> str:
    """40 rows (the last 8 the test split); the images of `bad_splits` are not images."""
    root.mkdir()
    rows = []
    for index in range(40):
        split = "test" if index >= 32 else "train"
        name = f"{index:03d}.png"
        if split in bad_splits:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n but not really")
        else:
            Image.new("RGB", (24, 24), (index * 6, 100, 200)).save(root / name)
        rows.append({"file_name": name, "caption": f"square number {index}", "split": split})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return str(root)


def _data_run(tmp_path: Path, dataset: str) -> PretrainArguments:
    # the most tolerant threshold: an all-bad source must stop whatever --max_bad_row_fraction says
    return PretrainArguments(
        **{**RUN, "save_steps": 0, "output_dir": str(tmp_path / "run")},
        dataset=dataset,
        text_column="caption",
        split_column="split",
        max_bad_row_fraction=1.0,
    )


def test_a_dataset_whose_images_all_fail_stops_before_training(tmp_path):
    args = _data_run(tmp_path, _imagefolder(tmp_path / "data", {"train", "test"}))
    with pytest.raises(ValueError, match=r"No image of the evaluation split could be decoded \(8 rows tried\)"):
        pretrain(args)


def test_a_training_split_whose_images_all_fail_stops_after_two_batches(tmp_path):
    args = _data_run(tmp_path, _imagefolder(tmp_path / "data", {"train"}))
    with pytest.raises(
        RuntimeError, match=r"Every one of the first 16 rows \(2 batches\) could not be decoded"
    ) as error:
        pretrain(args)
    # the examples name the files and why they failed
    assert re.search(r"data/0[0-3]\d\.png: UnidentifiedImageError: cannot identify image file", str(error.value))
    assert not (tmp_path / "run" / "model.safetensors").exists()


# --- a corrupted batch -------------------------------------------------------------------------------------------


def test_a_corrupted_micro_batch_is_skipped_without_poisoning_the_queue_or_the_weights(tmp_path, monkeypatch):
    """NaN pixels in the second micro-batch of step 2 of a multi-task run (ITM samples its hard negatives from the
    similarities, which the NaN rows spoil) with a momentum queue: the step (both
    micro-batches) is skipped and counted, later steps are finite, and neither the weights nor the queued negatives
    (saved with the checkpoint) hold a NaN."""
    calls = {"count": 0}
    collate = pretrain_module.ImageTextCollator.__call__

    def corrupting_collate(self, rows):
        batch = collate(self, rows)
        calls["count"] += 1
        if calls["count"] == 4:
            batch["pixel_values"][1:3] = float("nan")
        return batch

    monkeypatch.setattr(pretrain_module.ImageTextCollator, "__call__", corrupting_collate)
    args = PretrainArguments(
        **{
            **RUN,
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "save_steps": 4,
            "objectives": "contrastive,itm,mlm",
            "queue_size": 16,
            "gradient_accumulation_steps": 2,
            "num_train_examples": 48,
        }
    )
    metrics = pretrain(args)
    assert metrics["nonfinite_steps"] == 1 and metrics["train_steps"] == 4
    assert all(loss == loss for loss in metrics["losses"])
    for name, losses in metrics["objective_losses"].items():
        assert len(losses) == 4 and all(loss == loss for loss in losses), name
    weights = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors")
    assert {"momentum_encoder.image_queue", "momentum_encoder.text_queue"} <= weights.keys()
    for name, value in weights.items():
        assert torch.isfinite(value).all(), name


# --- a process that dies or hangs --------------------------------------------------------------------------------

# process 0 forms the group as a run does (build_accelerator); process 1, plain torch.distributed (cheaper to start),
# passes the first barrier, then dies or hangs
_SURVIVOR = """
import sys, time
import torch
from xmodal.training.pretraining.loop import PretrainArguments, build_accelerator

output_dir, timeout = sys.argv[1], int(sys.argv[2])
accelerator = build_accelerator(PretrainArguments(output_dir=output_dir, ddp_timeout=timeout))
accelerator.wait_for_everyone()
start = time.monotonic()
try:
    accelerator.reduce(torch.ones(1), reduction="sum")
finally:
    print(f"collective ended after {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
"""
_PEER = """
import os, sys, time
import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()
if sys.argv[1] == "dies":
    os._exit(3)
time.sleep(600)  # alive, but never joins the next collective operation
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("peer", ["hangs", pytest.param("dies", marks=pytest.mark.slow)])
def test_the_survivor_of_a_collective_fails_within_the_ddp_timeout(tmp_path, peer):
    """Two gloo processes started as a launcher starts them; after a first barrier, process 1 hangs or dies and
    process 0 calls an all-reduce: it fails after --ddp_timeout (4 s) for a hung peer, at once for a dead one (gloo
    notices the closed connection), instead of waiting forever."""
    timeout, port = 4, _free_port()
    environment = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    environment |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    commands = [[_SURVIVOR, str(tmp_path), str(timeout)], [_PEER, peer]]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", *command],
            env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, command in enumerate(commands)
    ]
    try:
        _, stderr = processes[0].communicate(timeout=300)
    finally:
        processes[1].kill()
        processes[1].communicate()
    assert processes[0].returncode != 0, stderr[-3000:]
    assert "collective ended after " in stderr, stderr[-3000:]
    waited = float(stderr.split("collective ended after ")[1].split(" s")[0])
    if peer == "hangs":
        assert "Timed out waiting 4000ms" in stderr, stderr[-3000:]
        assert timeout - 0.5 <= waited <= timeout + 20
    else:
        assert re.search(r"Connection (closed|reset) by peer|Timed out", stderr), stderr[-3000:]
        assert waited <= timeout + 20


def test_ddp_timeout_is_validated_and_reaches_the_process_group_handler():
    with pytest.raises(ValueError, match="--ddp_timeout must be at least 1"):
        PretrainArguments(ddp_timeout=0)
    # Accelerate drops handler values equal to its defaults (600 s): 600 must still reach the process group
    for seconds in (10, 600, 1800):
        handler = _process_group_timeout(seconds)
        assert handler.to_kwargs()["timeout"].total_seconds() == pytest.approx(seconds, abs=1e-3)


ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))
_LAUNCHED = """
import importlib, json, os, sys, time
import torch
torch.set_num_threads(1)
from accelerate import PartialState
from xmodal.training import PretrainArguments, pretrain
from xmodal.training.pretraining.builders import _process_group_timeout
pretrain_module = importlib.import_module("xmodal.training.pretraining.loop")
peer = sys.argv[2]
collate = pretrain_module.ImageTextCollator.__call__
calls = {"count": 0}

def failing_collate(self, rows):
    calls["count"] += 1
    if PartialState().process_index == 1 and calls["count"] == 3:
        if peer == "dies":
            os._exit(3)
        time.sleep(600)
    return collate(self, rows)

pretrain_module.ImageTextCollator.__call__ = failing_collate
pretrain(PretrainArguments(**json.loads(sys.argv[1])))
"""


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate launcher is not installed next to this Python")
@pytest.mark.parametrize("peer", ["hangs", "dies"])
def test_a_launched_run_whose_peer_dies_or_hangs_exits_with_an_error(tmp_path, peer):
    """`accelerate launch` with 2 processes; process 1 dies (the launcher then stops process 0) or hangs at its third
    batch (process 0's collective times out after --ddp_timeout, then the launcher stops process 1)."""
    script = tmp_path / "run.py"
    script.write_text(_LAUNCHED)
    arguments = {**RUN, "output_dir": str(tmp_path / "run"), "save_steps": 0, "ddp_timeout": 10, "batch_size": 4}
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script), json.dumps(arguments), peer]
    launcher = subprocess.Popen(
        command,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = launcher.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's own session: it and its workers
        launcher.communicate()
        pytest.fail(f"the launched run still waits after 400 s (peer {peer})")
    assert launcher.returncode != 0, stderr[-3000:]
    if peer == "hangs":
        assert "Timed out waiting 10000ms" in stderr, stderr[-3000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()


_FAILING_WRITE = """
import json, sys
import torch
torch.set_num_threads(1)
from accelerate import PartialState
from xmodal.training import PretrainArguments, pretrain
from xmodal.training.pretraining.builders import _process_group_timeout

save = torch.save
def failing_save(obj, path, *args, **kwargs):
    # process 1 cannot write its part of the second checkpoint
    if PartialState().process_index == 1 and "tmp-step-000004" in str(path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    return save(obj, path, *args, **kwargs)

torch.save = failing_save
pretrain(PretrainArguments(**json.loads(sys.argv[1])))
"""


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate launcher is not installed next to this Python")
def test_a_checkpoint_write_failing_on_one_process_stops_every_process(tmp_path):
    """Two processes write checkpoints; process 1 fails to write its RNG state of the second: both processes raise
    (none waits for the other in a collective), the incomplete copy is removed and the first checkpoint stays."""
    script = tmp_path / "run.py"
    script.write_text(_FAILING_WRITE)
    output_dir = tmp_path / "run"
    arguments = {**RUN, "output_dir": str(output_dir), "batch_size": 4, "ddp_timeout": 60}
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script), json.dumps(arguments)]
    result = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400
    )
    assert result.returncode != 0
    assert "[rank1]: OSError: Writing checkpoint" in result.stderr and "unexpected pos 576" in result.stderr
    assert "[rank0]: OSError: Writing checkpoint" in result.stderr and "failed on another process" in result.stderr
    assert "Timed out" not in result.stderr
    assert [Path(path).name for path in list_checkpoints(str(output_dir))] == ["step-000002"]
    assert _temporary_folders(output_dir) == []
