"""Publishing a saved xmodal model folder to the Hugging Face Hub.

    xmodal push --folder outputs/xmodal-tiny --repo_id your-name/xmodal-tiny [--private] [--revision dev] [--create_pr]

The folder `xmodal pretrain` writes (or any folder holding `model.save_pretrained` and `processor.save_pretrained`
output) is checked for completeness, then its weights, config, processor and tokenizer files, remote-code bundle,
model card, metrics and card pictures are uploaded in one commit. Nothing else is: checkpoints, optimizer state and
other files in the folder stay local. The card's how-to-use snippet gets the real repo id; the local folder is not
modified.

The token comes from the `token` argument, else `HF_TOKEN`, else the stored `hf auth login`; it is sent to the Hub
only and never printed, logged or written to a file.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token

from xmodal import XModalConfig
from xmodal.hub import BUNDLE_MODULES
from xmodal.training.publishing.cards import (
    LOSS_CURVE_FILE,
    RETRIEVAL_EXAMPLE_FILE,
    render_model_card,
    retarget_model_card,
)

logger = logging.getLogger(__name__)

BUNDLE_FILES: tuple[str, ...] = tuple(f"{name}.py" for name in BUNDLE_MODULES)
# top-level files of a model folder that are uploaded (everything else stays local)
UPLOAD_FILES: frozenset[str] = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "chat_template.jinja",
        "README.md",
        "metrics.json",
        LOSS_CURVE_FILE,
        RETRIEVAL_EXAMPLE_FILE,
        *BUNDLE_FILES,
    }
)
UPLOAD_PATTERNS: tuple[str, ...] = ("model-*-of-*.safetensors",)  # weight shards
DEFAULT_COMMIT_MESSAGE = "Upload xmodal model"


def upload_files(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` that `push_to_hub` uploads, sorted: top-level files named in `UPLOAD_FILES` or matching
    `UPLOAD_PATTERNS` (no sub-folders, so `checkpoints/` never is)."""
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_file()
        and (entry.name in UPLOAD_FILES or any(fnmatch.fnmatch(entry.name, p) for p in UPLOAD_PATTERNS))
    )


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return {}


def _auto_map_files(auto_map: dict[str, Any]) -> set[str]:
    """The local code files an `auto_map` names (values "file.Class", a [slow, fast] list, or "repo--file.Class")."""
    entries = [item for value in auto_map.values() for item in (value if isinstance(value, list) else [value])]
    return {f"{item.split('--')[-1].split('.')[0]}.py" for item in entries if item}


def missing_model_files(folder: str | os.PathLike) -> list[str]:
    """What `folder` lacks to load with `trust_remote_code` where xmodal is not installed: weights, config.json with
    an `auto_map`, the processor and tokenizer files and the remote-code bundle (each file named in an `auto_map`).
    Empty when the folder is complete."""
    folder = os.fspath(folder)
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    missing: list[str] = []
    config = _read_json(os.path.join(folder, "config.json"))
    if "config.json" not in present:
        missing.append("config.json")
    elif not config.get("auto_map"):
        missing.append("config.json `auto_map` (save with xmodal's save_pretrained)")
    if "model.safetensors.index.json" in present:
        index = _read_json(os.path.join(folder, "model.safetensors.index.json"))
        missing += sorted(set(index.get("weight_map", {}).values()) - present)
    elif "model.safetensors" not in present:
        missing.append("model.safetensors")
    if "tokenizer.json" not in present and "vocab.txt" not in present:
        missing.append("tokenizer.json (or vocab.txt)")
    missing += [name for name in ("tokenizer_config.json", "processor_config.json") if name not in present]
    processor_config = _read_json(os.path.join(folder, "processor_config.json"))
    referenced = _auto_map_files(config.get("auto_map", {})) | _auto_map_files(processor_config.get("auto_map", {}))
    referenced |= _auto_map_files(processor_config.get("image_processor", {}).get("auto_map", {}))
    missing += sorted((referenced | set(BUNDLE_FILES)) - present)
    return list(dict.fromkeys(missing))


def _model_card(folder: str, repo_id: str) -> bytes:
    """The card to upload: README.md with `repo_id` in its snippets, or one rendered from config and metrics."""
    readme = os.path.join(folder, "README.md")
    if os.path.isfile(readme):
        with open(readme, encoding="utf-8") as handle:
            return retarget_model_card(handle.read(), repo_id).encode("utf-8")
    metrics = _read_json(os.path.join(folder, "metrics.json"))
    images = {
        key: name
        for key, name in (("loss_curve_image", LOSS_CURVE_FILE), ("retrieval_example_image", RETRIEVAL_EXAMPLE_FILE))
        if os.path.isfile(os.path.join(folder, name))
    }
    card = render_model_card(
        XModalConfig.from_pretrained(folder),
        metrics,
        repo_id=repo_id,
        training_arguments=metrics.get("arguments"),
        **images,
    )
    return str(card).encode("utf-8")


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> CommitInfo:
    """Uploads a saved xmodal model folder to the Hub in one commit, creating the repo if needed.

    Args:
        folder: the model folder (weights, config, processor, remote-code bundle; card, metrics and pictures if any).
        repo_id: `namespace/name` of the model repo.
        token: a Hub token with write access; default `HF_TOKEN`, else the token stored by `hf auth login`.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from main if missing); default main.
        commit_message: the commit's summary.
        create_pr: open a pull request against main with the files instead of committing to it.
        endpoint: the Hub's URL; default `HF_ENDPOINT`, else https://huggingface.co.

    Returns:
        The commit: a `str` (its URL) whose `.oid` is the commit sha (pin it with `from_pretrained(...,
        revision=oid)`) and `.pr_url` the pull request's URL with `create_pr`.

    Raises:
        ValueError: if the folder is not a complete xmodal model folder (the message lists what is missing), if no
            token is found, or for `create_pr` with a `revision` other than a PR ref.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"push_to_hub needs a saved model folder; {folder!r} is not a folder.")
    missing = missing_model_files(folder)
    if missing:
        raise ValueError(
            f"{folder!r} is not a complete xmodal model folder, it lacks: {', '.join(missing)}. Save the model and "
            "the processor there with save_pretrained (xmodal pretrain does both)."
        )
    if create_pr and revision is not None and not revision.startswith("refs/pr/"):
        raise ValueError(f"create_pr opens a pull request against main; revision={revision!r} cannot go with it.")
    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token: pass token=..., set the HF_TOKEN environment variable, or run `hf auth login`."
        )
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    names = upload_files(folder)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
        for name in names
        if name != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=_model_card(folder, repo_id)))
    logger.info("Uploading %d files from %s to %s", len(operations), folder, repo_id)
    return api.create_commit(
        repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
    )


__all__ = [
    "BUNDLE_FILES",
    "DEFAULT_COMMIT_MESSAGE",
    "UPLOAD_FILES",
    "UPLOAD_PATTERNS",
    "missing_model_files",
    "push_to_hub",
    "upload_files",
]
