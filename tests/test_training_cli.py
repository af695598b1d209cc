"""The `xmodal` command line: help of every command, zero-shot and retrieval end to end on a tiny saved model,
argument errors, push and finetune wiring, and the installed console script."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_training_inference import save_tiny_model, solid

from xmodal.training.cli import COMMANDS, main
from xmodal.training.inference.zero_shot import ZeroShotClassifier

HELP_MENTIONS = {
    "pretrain": ["--max_steps", "--objectives", "--tower_style", "--vision_tower"],
    "evaluate": ["--model", "--num_eval_examples"],
    "finetune": ["--task", "image-classification, vqa", "--gradient_accumulation_steps", "--dataset", "--max_steps"],
    "push": ["--folder", "--repo_id", "--private", "--revision", "--commit_message"],
    "zero-shot": ["IMAGE [IMAGE ...]", "--labels", "--labels_file", "--templates", "--top_k", "positional"],
    "retrieve": [
        "--images",
        "--query",
        "--image",
        "--texts",
        "--texts_file",
        "--top_k",
        "--cache_dir",
        "--search_backend",
    ],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(folder)
    return folder


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    folder = tmp_path / "pictures"
    (folder / "more").mkdir(parents=True)
    for name, colour in (("red.png", "red"), ("blue.png", "blue"), ("more/green.png", "green")):
        solid(colour).save(folder / name)
    return folder


def _table(output: str, header: str) -> list[list[str]]:
    """The rows (cells split on runs of 2+ spaces) of the table under `header`, up to the next blank line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == header.split())
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append([cell for cell in line.strip().split("  ") if cell])
    return [[cell.strip() for cell in row] for row in rows]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_readable_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith(f"usage: xmodal {command}")
    for mention in HELP_MENTIONS[command]:
        assert mention in help_text, (command, mention)


def test_main_help_and_unknown_command(capsys):
    assert main([]) == 0 and main(["--help"]) == 0
    output = capsys.readouterr().out
    assert all(f"xmodal {command}" in output for command in COMMANDS)
    assert main(["zero_shot"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'zero_shot'" in err and "zero-shot, retrieve" in err


def test_zero_shot_prints_a_ranked_table_per_image(model_dir, pictures, capsys):
    images = [str(pictures / "red.png"), str(pictures / "more/green.png")]
    labels = ["red", "green", "blue"]
    code = main(["zero-shot", *images, "--labels", " red, green ,blue", "--model", str(model_dir), "--top_k", "3"])
    assert code == 0
    output = capsys.readouterr().out
    assert images[0] in output and images[1] in output
    from xmodal import XModalModel, XModalProcessor

    model, processor = XModalModel.from_pretrained(model_dir), XModalProcessor.from_pretrained(model_dir)
    expected = ZeroShotClassifier(model, processor, labels).classify(images, top_k=3)
    tables = output.split("\n\n")
    assert len(tables) == 2
    for table, ranked in zip(tables, expected):
        rows = _table(table, "rank  label  probability")
        assert [row[0] for row in rows] == ["1", "2", "3"]
        assert [row[1] for row in rows] == [label for label, _ in ranked]
        assert [float(row[2]) for row in rows] == [pytest.approx(p, abs=1e-4) for _, p in ranked]
        assert sum(float(row[2]) for row in rows) == pytest.approx(1.0, abs=1e-3)

    # --images, one template, top_k 1
    main(["zero-shot", "--images", images[0], "--labels", "red,blue", "--model", str(model_dir)] + ["--top_k", "1"])
    assert len(_table(capsys.readouterr().out, "rank label probability")) == 1
    assert (
        main(["zero-shot", images[0], "--labels", "red,blue", "--templates", "a {} one", "--model", str(model_dir)])
        == 0
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--labels", "a,b", "--templates", "a photo of {}.|a photo"], "no '{}' placeholder"),
        ([], "exactly one of --labels"),
        (["--labels", " , "], "holds no label"),
        (["--labels", "a", "--top_k", "0"], "--top_k must be at least 1"),
    ],
)
def test_zero_shot_argument_errors(model_dir, pictures, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["zero-shot", str(pictures / "red.png"), "--model", str(model_dir), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_zero_shot_needs_existing_images(model_dir, pictures, capsys):
    for argv in (
        ["zero-shot", "--labels", "a,b", "--model", str(model_dir)],
        ["zero-shot", str(pictures / "nope.png"), "--labels", "a,b", "--model", str(model_dir)],
        ["zero-shot", str(pictures / "red.png"), "--images", str(pictures / "blue.png"), "--labels", "a"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert "No image given" in errors and "nope.png" in errors and "not both" in errors


def test_retrieve_ranks_a_folder_and_caches_it(model_dir, pictures, tmp_path, capsys):
    argv = ["retrieve", "--model", str(model_dir), "--images", str(pictures), "--query", "a red circle"]
    assert main([*argv, "--top_k", "2"]) == 0
    output = capsys.readouterr().out
    assert "3 images (3 embedded, 0 cached)" in output
    rows = _table(output, "rank  image  score")
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(Path(row[1]).is_file() and Path(row[1]).is_relative_to(pictures) for row in rows)
    assert float(rows[0][2]) >= float(rows[1][2])

    assert main(argv) == 0
    output = capsys.readouterr().out
    assert "3 images (0 embedded, 3 cached)" in output and len(_table(output, "rank image score")) == 3

    cache_dir = tmp_path / "cache"
    assert main([*argv, "--cache_dir", str(cache_dir)]) == 0
    assert "(3 embedded, 0 cached)" in capsys.readouterr().out and any(cache_dir.iterdir())
    assert main([*argv, "--no_cache"]) == 0
    assert "(3 embedded, 0 cached)" in capsys.readouterr().out
    # both search backends give the same ranking (faiss-cpu is a dev dependency)
    for backend in ("torch", "faiss"):
        assert main([*argv, "--top_k", "2", "--search_backend", backend]) == 0
        assert _table(capsys.readouterr().out, "rank  image  score") == rows, backend


def test_retrieve_ranks_texts_for_an_image(model_dir, pictures, tmp_path, capsys):
    texts = ["a red circle", "a blue square", "a green star"]
    image = str(pictures / "blue.png")
    assert main(["retrieve", "--model", str(model_dir), "--image", image, "--texts", ",".join(texts)]) == 0
    rows = _table(capsys.readouterr().out, "rank  text  score")
    assert sorted(row[1] for row in rows) == sorted(texts) and [row[0] for row in rows] == ["1", "2", "3"]
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("a red circle, on the left\n\na blue square\n")
    assert main(["retrieve", "--model", str(model_dir), "--image", image, "--texts_file", str(texts_file)]) == 0
    rows = _table(capsys.readouterr().out, "rank  text  score")
    assert sorted(row[1] for row in rows) == ["a blue square", "a red circle, on the left"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--images", "MISSING", "--query", "a cat"], "is not a folder"),
        (["--query", "a cat"], "give it with --images FOLDER"),
        (["--images", "PICTURES", "--query", "a", "--image", "PICTURES/red.png"], "exactly one of --query"),
        (["--image", "PICTURES/red.png"], "exactly one of --texts"),
        (["--image", "PICTURES/nope.png", "--texts", "a,b"], "is not a file"),
        (["--images", "PICTURES", "--query", "a", "--search_backend", "annoy"], "--search_backend must be one of"),
    ],
)
def test_retrieve_argument_errors(model_dir, pictures, capsys, arguments, message):
    arguments = [a.replace("PICTURES", str(pictures)).replace("MISSING", str(pictures / "missing")) for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        main(["retrieve", "--model", str(model_dir), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


class FakeCommitInfo(str):
    """Like huggingface_hub's CommitInfo: the commit URL as a string, with `pr_url`."""

    pr_url: str | None = None


def test_push_calls_push_to_hub(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_push_to_hub(folder, repo_id, **kwargs):
        calls.append((folder, repo_id, kwargs))
        commit = FakeCommitInfo(f"https://huggingface.co/{repo_id}/commit/0123")
        commit.pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if kwargs["create_pr"] else None
        return commit

    monkeypatch.setitem(
        sys.modules, "xmodal.training.publishing.push", types.SimpleNamespace(push_to_hub=fake_push_to_hub)
    )
    argv = ["push", "--folder", str(tmp_path), "--repo_id", "me/tiny", "--private", "--revision", "dev"]
    assert main([*argv, "--commit_message", "first"]) == 0
    assert calls[-1] == (
        str(tmp_path),
        "me/tiny",
        {"private": True, "revision": "dev", "create_pr": False, "commit_message": "first"},
    )
    output = capsys.readouterr().out
    assert "https://huggingface.co/me/tiny/commit/0123" in output and "Pull request" not in output
    main(["push", "--folder", str(tmp_path), "--repo_id", "me/tiny", "--create_pr"])
    assert "commit_message" not in calls[-1][2] and calls[-1][2]["private"] is False
    assert "Pull request: https://huggingface.co/me/tiny/discussions/1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--folder", str(tmp_path / "nothing"), "--repo_id", "me/tiny"])
    assert exit_info.value.code == 2 and "is not a folder" in capsys.readouterr().err

    def refusing_push_to_hub(folder, repo_id, **kwargs):
        raise ValueError("No Hugging Face token: set HF_TOKEN or run `hf auth login`.")

    monkeypatch.setitem(
        sys.modules, "xmodal.training.publishing.push", types.SimpleNamespace(push_to_hub=refusing_push_to_hub)
    )
    assert main(["push", "--folder", str(tmp_path), "--repo_id", "me/tiny"]) == 2
    assert "xmodal push: No Hugging Face token" in capsys.readouterr().err


def test_finetune_command_reads_flags_and_yaml(monkeypatch, tmp_path, capsys):
    finetune_module = importlib.import_module("xmodal.training.transfer.finetune")
    seen = []

    def fake_finetune(args):
        seen.append(args)
        return {"eval_rows": 10, "eval_accuracy": 0.5, "train_loss": 1.25, "train_steps": 7}

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    assert main(["finetune", "--task", "vqa", "--gradient_accumulation_steps", "2", "--max_steps", "7"]) == 0
    assert (seen[-1].task, seen[-1].gradient_accumulation_steps, seen[-1].output_dir) == (
        "vqa",
        2,
        "outputs/xmodal-vqa",
    )
    assert "Held-out accuracy (vqa, 10 rows): 50.0%" in capsys.readouterr().out
    config = tmp_path / "finetune.yaml"
    config.write_text("task: image-classification\nbatch_size: 4\noutput_dir: somewhere\n")
    assert main(["finetune", str(config)]) == 0
    assert (seen[-1].batch_size, seen[-1].output_dir) == (4, "somewhere")
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--task", "segmentation"])
    assert exit_info.value.code == 2 and "--task must be one of" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).parent / "xmodal"
    if not script.is_file():
        pytest.fail(f"console script {script} is not installed (pip install -e .)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(f"xmodal {command}" in result.stdout for command in COMMANDS)
