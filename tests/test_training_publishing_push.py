"""Publishing, end to end against a local Hub server (tests/hub_server.py): `xmodal push` / `push_to_hub` and
transformers' `model.push_to_hub` upload a model that then loads with trust_remote_code from the server in a fresh
process where xmodal cannot be imported, with the same outputs, at the newest or a pinned revision.

huggingface_hub reads HF_ENDPOINT when it is imported, so the pushes that rely on it (`xmodal push`, transformers'
`push_to_hub`) and the loads run in subprocesses with the environment set; the in-process pushes pass `endpoint=`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hub_server import HubServer
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from PIL import Image
from safetensors.torch import load_file
from test_modeling_hub import _BLOCK_XMODAL, _run_without_xmodal

from xmodal import XModalImageProcessor, XModalModel, XModalProcessor, train_tokenizer
from xmodal.training.publishing.cards import write_model_card
from xmodal.training.publishing.plots import retrieval_example_picture
from xmodal.training.publishing.push import BUNDLE_FILES, missing_model_files, push_to_hub

TOKEN = "hf_xmodalTestToken0123456789abcdef"
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "two yellow stars", "a purple cross at the top"]
UPLOADED = {
    "config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "metrics.json",
    "loss_curve.png",
    "retrieval_example.png",
    *BUNDLE_FILES,
}


def _hub_settings(hub: HubServer, hf_home: Path) -> dict[str, str]:
    """The environment variables that point a client process at `hub`, with a fresh cache."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}


def _outputs(model: XModalModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return {"text_embeds": out.text_embeds, "image_embeds": out.image_embeds, "logits": out.logits_per_image}


_PUSH_SCRIPT = textwrap.dedent(
    """
    import sys
    from xmodal import XModalModel
    from xmodal.training.cli import main

    folder = sys.argv[1]
    assert main(["push", "--folder", folder, "--repo_id", "user/repo"]) == 0
    XModalModel.from_pretrained(folder).push_to_hub("user/repo2")
    print("PUSH-OK")
    """
)

_LOAD_SCRIPT = _BLOCK_XMODAL + textwrap.dedent(
    """

    import json
    import os

    work_dir, out_path = sys.argv[1], sys.argv[2]
    settings = json.loads(open(f"{work_dir}/hub.json").read())
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # _run_without_xmodal sets HF_HUB_OFFLINE
        os.environ.pop(name, None)
    os.environ.update(settings["env"])

    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor

    images = [Image.open(f"{work_dir}/image_{i}.png") for i in range(3)]
    processor = AutoProcessor.from_pretrained("user/repo", trust_remote_code=True)
    inputs = dict(processor(images=images, text=settings["captions"], padding=True, return_tensors="pt"))
    results = {f"inputs.{key}": value for key, value in inputs.items()}
    for name, repo, revision in (("main", "user/repo", None), ("first", "user/repo", settings["first_sha"]),
                                 ("transformers", "user/repo2", None)):
        model = AutoModel.from_pretrained(repo, revision=revision, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            out = model(**inputs)
        results.update({f"{name}.text_embeds": out.text_embeds, f"{name}.image_embeds": out.image_embeds,
                        f"{name}.logits": out.logits_per_image})
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    assert "xmodal" not in sys.modules
    save_file({key: value.contiguous() for key, value in results.items()}, out_path)
    print("LOAD-OK")
    """
)


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory) -> SimpleNamespace:
    """A tiny model saved like `xmodal pretrain` saves it, pushed twice to user/repo (weights changed in between)
    and once with transformers' push_to_hub to user/repo2, then loaded back from the server without xmodal."""
    work = tmp_path_factory.mktemp("publish")
    folder = work / "run"
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=60, model_max_length=16)
    from conftest import XModalModelTester

    torch.manual_seed(0)
    model = XModalModel(XModalModelTester(vocab_size=len(tokenizer)).get_config()).eval()
    processor = XModalProcessor(XModalImageProcessor(size={"height": 16, "width": 16}), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(work / f"image_{i}.png")
    images = [Image.open(work / f"image_{i}.png") for i in range(3)]
    metrics = {"losses": [4.0 - 0.1 * i for i in range(25)], "test_text_to_image_R@1": 0.5}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    retrieval_example_picture(CAPTIONS[0], images, [0.9, 0.5, 0.1], folder / "retrieval_example.png")
    write_model_card(folder, model.config, metrics, num_parameters=model.num_parameters())
    # run leftovers that must stay local
    (folder / "checkpoints" / "step-000010").mkdir(parents=True)
    (folder / "checkpoints" / "step-000010" / "model.safetensors").write_bytes(b"checkpoint")
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "notes.txt").write_text("local notes")

    inputs = dict(processor(images=images, text=CAPTIONS[:3], padding=True, return_tensors="pt"))
    first = _outputs(model, inputs)
    first_weights = (folder / "model.safetensors").read_bytes()
    push = subprocess.run(
        [sys.executable, "-c", _PUSH_SCRIPT, str(folder)],
        cwd=work,
        env={
            **{
                key: value
                for key, value in os.environ.items()
                if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
            },
            **_hub_settings(hub, work / "push_home"),
            "HF_HUB_VERBOSITY": "debug",
            "TRANSFORMERS_VERBOSITY": "debug",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert push.returncode == 0 and "PUSH-OK" in push.stdout, push.stderr[-4000:]
    first_sha = re.search(r"/commit/([0-9a-f]{40})", push.stdout).group(1)

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    second = _outputs(model, inputs)
    commit = push_to_hub(folder, "user/repo", token=TOKEN, endpoint=hub.url, commit_message="Second push")

    (work / "hub.json").write_text(
        json.dumps({"env": _hub_settings(hub, work / "load_home"), "first_sha": first_sha, "captions": CAPTIONS[:3]})
    )
    out_path = work / "loaded.safetensors"
    assert "LOAD-OK" in _run_without_xmodal(_LOAD_SCRIPT, work, out_path, work)
    return SimpleNamespace(
        work=work,
        folder=folder,
        inputs=inputs,
        first=first,
        second=second,
        first_sha=first_sha,
        first_weights=first_weights,
        commit=commit,
        push_output=push.stdout + push.stderr,
        loaded=load_file(out_path),
    )


def _assert_outputs(loaded: dict[str, torch.Tensor], name: str, expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(loaded[f"{name}.{key}"], value, atol=1e-5, rtol=0)


def test_push_uploads_the_model_folder_and_nothing_else(published, hub):
    assert set(hub.files("user/repo")) == UPLOADED
    assert set(hub.files("user/repo", published.first_sha)) == UPLOADED
    assert hub.files("user/repo")["model.safetensors"] == (published.folder / "model.safetensors").read_bytes()
    assert hub.files("user/repo", published.first_sha)["model.safetensors"] == published.first_weights
    for name in BUNDLE_FILES + ("config.json", "tokenizer.json", "processor_config.json"):
        assert hub.files("user/repo")[name] == (published.folder / name).read_bytes(), name
    config = json.loads(hub.files("user/repo")["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_xmodal.XModalModel"


def test_each_push_is_one_commit_and_main_moves(published, hub):
    history = hub.history("user/repo")
    assert [commit.message for commit in history] == ["Second push", "Upload xmodal model", "initial commit"]
    assert history[1].oid == published.first_sha and history[0].oid == published.commit.oid
    assert published.commit == f"{hub.url}/user/repo/commit/{published.commit.oid}"
    # the second commit only carries what changed
    changed = {path for path, oid in history[0].tree.items() if history[1].tree.get(path) != oid}
    assert changed == {"model.safetensors"}


def test_pushed_model_loads_without_xmodal_with_the_same_outputs(published):
    _assert_outputs(published.loaded, "main", published.second)
    for key, value in published.inputs.items():
        assert torch.equal(published.loaded[f"inputs.{key}"], value), key


def test_pinned_revision_loads_the_first_push(published):
    _assert_outputs(published.loaded, "first", published.first)
    assert not torch.allclose(published.loaded["first.text_embeds"], published.loaded["main.text_embeds"], atol=1e-3)


def test_pushed_card_names_the_repo_and_shows_the_pictures(published, hub):
    card = hub.files("user/repo")["README.md"].decode()
    assert 'AutoModel.from_pretrained("user/repo", trust_remote_code=True)' in card
    assert 'model="user/repo"' in card and "your-name/" not in card
    assert "# repo\n" in card and "- name: repo\n" in card
    assert "![training loss](loss_curve.png)" in card and "![retrieval example](retrieval_example.png)" in card
    local_card = (published.folder / "README.md").read_text()
    assert 'from_pretrained("your-name/run", trust_remote_code=True)' in local_card
    assert ("POST", "/api/validate-yaml", True) in hub.requests


def test_token_is_sent_but_never_printed_or_stored(published, hub):
    assert all(has_auth for method, _, has_auth in hub.requests if method == "POST")
    # the push ran with debug logging (each request is logged), and its output holds no token
    assert "/api/models/user/repo/commit/main" in published.push_output and TOKEN not in published.push_output
    assert not any(TOKEN.encode() in blob for blob in hub.blobs.values())
    # nor written to the model folder or the Hub caches of the pushing and loading processes
    roots = (published.folder, published.work / "push_home", published.work / "load_home")
    files = [path for root in roots for path in root.rglob("*") if path.is_file()]
    assert any("load_home" in str(path) for path in files)  # the loader's cache is searched too
    assert [path for path in files if TOKEN.encode() in path.read_bytes()] == []


def test_transformers_push_to_hub_uploads_the_remote_code(published, hub):
    files = hub.files("user/repo2")
    assert set(BUNDLE_FILES) | {"config.json", "model.safetensors", "README.md"} <= set(files)
    # the model is pushed on its own: the processor goes with XModalProcessor.push_to_hub or xmodal push
    assert "processor_config.json" not in files
    _assert_outputs(published.loaded, "transformers", published.first)


def test_push_to_a_branch_and_as_a_pull_request_and_tag_a_commit(published, hub, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(published.folder, folder)
    main_before = hub.history("user/repo")[0].oid
    (folder / "metrics.json").write_text(json.dumps({"test_text_to_image_R@1": 0.75}))
    branch = push_to_hub(folder, "user/repo", token=TOKEN, endpoint=hub.url, revision="dev")
    assert hub.files("user/repo", "dev")["metrics.json"] == (folder / "metrics.json").read_bytes()
    assert hub.history("user/repo", "dev")[1].oid == main_before and branch.oid != main_before
    (folder / "metrics.json").write_text(json.dumps({"test_text_to_image_R@1": 0.8}))
    pull_request = push_to_hub(folder, "user/repo", token=TOKEN, endpoint=hub.url, create_pr=True)
    assert pull_request.pr_url and pull_request.pr_revision.startswith("refs/pr/")
    assert hub.files("user/repo", pull_request.pr_revision)["metrics.json"] == (folder / "metrics.json").read_bytes()
    assert hub.history("user/repo")[0].oid == main_before
    HfApi(endpoint=hub.url, token=TOKEN).create_tag("user/repo", tag="v1", revision=published.first_sha)
    assert hub.files("user/repo", "v1")["model.safetensors"] == published.first_weights


def test_push_renders_a_card_when_the_folder_has_none(published, hub, tmp_path):
    folder = tmp_path / "no_card"
    shutil.copytree(published.folder, folder)
    (folder / "README.md").unlink()
    push_to_hub(folder, "user/no-card", token=TOKEN, endpoint=hub.url)
    card = hub.files("user/no-card")["README.md"].decode()
    assert 'AutoModel.from_pretrained("user/no-card", trust_remote_code=True)' in card
    assert "Text-to-image Recall@1" in card and "![training loss](loss_curve.png)" in card
    assert not (folder / "README.md").exists()


def test_push_without_a_token_is_refused_before_any_request(published, hub, monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    requests_before = len(hub.requests)
    with pytest.raises(ValueError, match="No Hugging Face token.*HF_TOKEN.*hf auth login"):
        push_to_hub(published.folder, "user/repo", endpoint=hub.url)
    assert len(hub.requests) == requests_before


def test_push_with_a_wrong_token_fails_without_showing_it(published, hub):
    with pytest.raises(HfHubHTTPError, match="401") as error:
        push_to_hub(published.folder, "user/other", token="hf_wrong_token_value", endpoint=hub.url)
    assert "hf_wrong_token_value" not in str(error.value)


def test_incomplete_folders_are_refused_with_what_is_missing(published, tmp_path):
    model_only = tmp_path / "model_only"
    XModalModel.from_pretrained(published.folder).save_pretrained(model_only)
    missing = missing_model_files(model_only)
    assert {"tokenizer.json (or vocab.txt)", "tokenizer_config.json", "processor_config.json"} <= set(missing)
    assert "model.safetensors" not in missing and not set(BUNDLE_FILES) & set(missing)

    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(published.folder / "model.safetensors", weights_only)
    (weights_only / "config.json").write_text(json.dumps({"model_type": "xmodal"}))
    missing = missing_model_files(weights_only)
    assert "config.json `auto_map` (save with xmodal's save_pretrained)" in missing
    assert set(BUNDLE_FILES) <= set(missing)
    with pytest.raises(ValueError, match=r"not a complete xmodal model folder, it lacks: .*modeling_xmodal\.py"):
        push_to_hub(weights_only, "user/repo", token=TOKEN, endpoint="http://127.0.0.1:9")
    assert missing_model_files(published.folder) == []

    sharded = tmp_path / "sharded"
    shutil.copytree(published.folder, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert missing_model_files(sharded) == ["model-00002-of-00002.safetensors"]


def test_server_answers_missing_repos_revisions_and_files_with_typed_errors(published, hub, tmp_path):
    cases = [
        ({"repo_id": "user/none", "filename": "config.json"}, RepositoryNotFoundError),
        ({"repo_id": "user/repo", "filename": "config.json", "revision": "no-such-branch"}, RevisionNotFoundError),
        ({"repo_id": "user/repo", "filename": "no-such-file.json"}, EntryNotFoundError),
        ({"repo_id": "user/repo", "filename": "checkpoints/step-000010/model.safetensors"}, EntryNotFoundError),
    ]
    for kwargs, error in cases:
        with pytest.raises(error):
            hf_hub_download(**kwargs, endpoint=hub.url, cache_dir=tmp_path, token=TOKEN)
    path = hf_hub_download(
        "user/repo", "config.json", revision=published.first_sha, endpoint=hub.url, cache_dir=tmp_path
    )
    assert Path(path).read_bytes() == hub.files("user/repo", published.first_sha)["config.json"]
