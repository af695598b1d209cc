"""Security: the remote-code bundle holds only the generated xmodal files, whose code imports only an allow-list and
runs no foreign code, opens no connection and writes no file beyond the bundle itself; a Hub token never reaches a
log, a card, a config or a checkpoint; image paths from datasets cannot escape the dataset's folder.

Covered elsewhere: the token of `xmodal push` (test_training_publishing_push.py greps the push's debug output, the uploaded
files and the Hub caches), CSV paths with `..` or absolute paths elsewhere (test_training_data_sources.py), and the
pickle-loading policy (test_modeling_loading.py covers the loading work)."""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from xmodal import XModalImageProcessor, XModalModel, XModalProcessor, train_tokenizer
from xmodal.hub import BUNDLE_MODULES, bundle_source
from xmodal.training.cli import main
from xmodal.training.data import load_image_text_dataset, with_lazy_decoding

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "two yellow stars", "a purple cross at the top"]

# --- the remote-code bundle --------------------------------------------------------------------------------------

BUNDLE_FILES = {f"{name}.py" for name in BUNDLE_MODULES}
THIRD_PARTY = {"torch", "transformers", "numpy", "PIL", "safetensors"}
# standard-library modules that open connections, start processes, load code, deserialise with pickle or manage
# files wholesale: none of them belongs in code that `trust_remote_code` runs
DENIED_STDLIB = {
    "asyncio", "code", "codeop", "concurrent", "ctypes", "dbm", "ftplib", "http", "imaplib", "marshal",
    "multiprocessing", "nntplib", "pickle", "poplib", "pty", "runpy", "shelve", "shutil", "smtplib", "socket",
    "socketserver", "ssl", "subprocess", "telnetlib", "tempfile", "urllib", "webbrowser", "xmlrpc", "zipimport",
}  # fmt: skip
ALLOWED_STDLIB = set(sys.stdlib_module_names) - DENIED_STDLIB
# builtins that run code or stop in a debugger
DENIED_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint", "input"}
# attribute calls that load or run code or processes, whatever their object
DENIED_METHODS = {
    "import_module", "exec_module", "load_module", "module_from_spec", "spec_from_file_location", "run_path",
    "run_module", "system", "popen", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve",
    "spawnl", "kill", "killpg",
}  # fmt: skip
# attributes that sandbox escapes go through
DENIED_ATTRIBUTES = {"__subclasses__", "__globals__", "__code__", "__builtins__"}
# file-system writes: allowed only in the functions that write the bundle itself (save_pretrained's remote code)
WRITE_METHODS = {
    "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "makedirs", "mkdir", "chmod", "chown",
    "symlink", "link", "truncate", "write_text", "write_bytes", "touch",
}  # fmt: skip
WRITERS = {("hub", "write_remote_code")}


def _call_name(node: ast.Call) -> tuple[str | None, str | None]:
    """(object, name) of a call: `(None, "open")` for `open(...)`, `("os", "replace")` for `os.replace(...)`, the
    object None when it is not a plain name."""
    if isinstance(node.func, ast.Name):
        return None, node.func.id
    if isinstance(node.func, ast.Attribute):
        value = node.func.value
        return (value.id if isinstance(value, ast.Name) else None), node.func.attr
    return None, None


def _open_mode(node: ast.Call) -> str | None:
    """The mode of an `open(...)` call: "r" by default, None when it is not a literal string."""
    mode: ast.expr | None = node.args[1] if len(node.args) > 1 else None
    mode = next((keyword.value for keyword in node.keywords if keyword.arg == "mode"), mode)
    if mode is None:
        return "r"
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else None


def bundle_violations(name: str, source: str) -> list[str]:
    """What the bundle file `name` does that remote code must not (empty when nothing):

    - imports other than the standard library (without DENIED_STDLIB), THIRD_PARTY and `from .<sibling> import`;
    - calls of DENIED_BUILTINS or DENIED_METHODS, access to DENIED_ATTRIBUTES;
    - `torch.load` without a literal `weights_only=True`, any `trust_remote_code=True`;
    - file writes (`open` with a mode holding w, a, x or +, or a non-literal mode; WRITE_METHODS calls) outside the
      WRITERS functions.
    """
    problems = []
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

    def function_of(node: ast.AST) -> str | None:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return None

    for node in ast.walk(tree):
        where = f"{name}.py:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root not in ALLOWED_STDLIB | THIRD_PARTY:
                    problems.append(f"{where} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level != 1 or node.module not in BUNDLE_MODULES:
                    problems.append(f"{where} imports {'.' * node.level}{node.module or ''} (not a bundle sibling)")
            elif node.module.split(".")[0] not in ALLOWED_STDLIB | THIRD_PARTY:
                problems.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Attribute) and node.attr in DENIED_ATTRIBUTES:
            problems.append(f"{where} accesses {node.attr}")
        elif isinstance(node, ast.Call):
            owner, called = _call_name(node)
            writer = (name, function_of(node)) in WRITERS
            if owner is None and called in DENIED_BUILTINS and isinstance(node.func, ast.Name):
                problems.append(f"{where} calls {called}()")
            elif isinstance(node.func, ast.Attribute) and called in DENIED_METHODS:
                problems.append(f"{where} calls .{called}()")
            elif isinstance(node.func, ast.Attribute) and called in WRITE_METHODS and not writer:
                problems.append(f"{where} calls .{called}() outside the bundle writer")
            elif isinstance(node.func, ast.Name) and called == "open" and not writer:
                mode = _open_mode(node)
                if mode is None or set(mode) & set("wax+"):
                    problems.append(f"{where} opens a file with mode {mode!r} outside the bundle writer")
            if owner == "torch" and called == "load":
                weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where} calls torch.load without weights_only=True")
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    problems.append(f"{where} passes trust_remote_code={ast.unparse(keyword.value)}")
    return problems


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `save_pretrained` of a tiny model and its processor writes."""
    from conftest import XModalModelTester

    folder = tmp_path_factory.mktemp("bundle")
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=60, model_max_length=16)
    XModalModel(XModalModelTester(vocab_size=len(tokenizer)).get_config()).save_pretrained(folder)
    XModalProcessor(XModalImageProcessor(size={"height": 16, "width": 16}), tokenizer).save_pretrained(folder)
    return folder


def test_the_saved_folder_holds_only_the_generated_bundle_and_data_files(saved_folder):
    files = {path.name for path in saved_folder.iterdir()}
    assert {name for name in files if name.endswith(".py")} == BUNDLE_FILES
    # everything else is data: JSON, safetensors, text; nothing pickled, compiled or executable
    assert {Path(name).suffix for name in files - BUNDLE_FILES} <= {".json", ".safetensors", ".txt", ".jinja"}, files
    assert not [path for path in saved_folder.rglob("*") if path.is_dir()]
    for name in BUNDLE_MODULES:  # the generated text, nothing added
        assert (saved_folder / f"{name}.py").read_text(encoding="utf-8") == bundle_source(name), name


@pytest.mark.parametrize("name", sorted(BUNDLE_MODULES))
def test_bundled_code_imports_only_the_allow_list_and_runs_no_foreign_code(saved_folder, name):
    assert bundle_violations(name, (saved_folder / f"{name}.py").read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import subprocess", "imports subprocess"),
        ("from urllib.request import urlopen", "imports from urllib.request"),
        ("import requests", "imports requests"),
        ("from huggingface_hub import hf_hub_download", "imports from huggingface_hub"),
        ("from .other_module import thing", "not a bundle sibling"),
        ("from . import modeling_xmodal", "not a bundle sibling"),
        ("eval('1')", "calls eval()"),
        ("exec(code)", "calls exec()"),
        ("importlib.import_module('x')", "calls .import_module()"),
        ("os.system('ls')", "calls .system()"),
        ("().__class__.__subclasses__()", "accesses __subclasses__"),
        ("torch.load(path)", "torch.load without weights_only=True"),
        ("torch.load(path, weights_only=False)", "torch.load without weights_only=True"),
        ("AutoModel.from_pretrained(repo, trust_remote_code=True)", "trust_remote_code=True"),
        ("open(path, 'w')", "mode 'w'"),
        ("open(path, mode='ab')", "mode 'ab'"),
        ("open(path, mode)", "mode None"),
        ("os.remove(path)", "calls .remove() outside the bundle writer"),
        ("Path(path).write_text('x')", "calls .write_text() outside the bundle writer"),
    ],
)
def test_the_scan_catches_what_it_forbids(source, expected):
    problems = bundle_violations("modeling_xmodal", f"def function():\n    {source}\n")
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_scan_allows_reads_and_the_bundle_writer():
    assert (
        bundle_violations("modeling_xmodal", "import json\nwith open(path, encoding='utf-8') as f:\n    x = 1\n") == []
    )
    assert bundle_violations("modeling_xmodal", "state = torch.load(path, weights_only=True)\n") == []
    writer = "def write_remote_code(folder):\n    os.makedirs(folder)\n    open(p, 'w')\n    os.replace(a, b)\n"
    assert bundle_violations("hub", writer) == []
    assert len(bundle_violations("modeling_xmodal", writer)) == 3  # the same code anywhere else


# --- tokens ------------------------------------------------------------------------------------------------------

TOKEN = "hf_securityTestToken0123456789abcdefXYZ"


def test_a_training_run_never_writes_or_logs_the_hub_token(tmp_path, monkeypatch, capfd, caplog):
    """`xmodal pretrain` with the token in the environment (as `xmodal push` reads it) and every logger at DEBUG:
    neither its output, nor its logs, nor any file of the run (weights, config, card, metrics, checkpoints with
    optimizer and RNG states, tokenizer) holds the token."""
    import huggingface_hub.utils.logging as hub_logging
    import transformers

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, TOKEN)
    caplog.set_level(logging.DEBUG)
    transformers.logging.set_verbosity_debug()
    hub_logging.set_verbosity_debug()
    tower = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2}
    overrides = {"vision_config": {**tower, "image_size": 16, "patch_size": 4}, "text_config": tower}
    output_dir = tmp_path / "run"
    try:
        code = main(
            ["pretrain", "--output_dir", str(output_dir), "--max_steps", "2", "--save_steps", "1", "--batch_size", "8"]
            + [
                "--num_train_examples",
                "16",
                "--num_eval_examples",
                "8",
                "--eval_batch_size",
                "8",
                "--warmup_steps",
                "0",
            ]
            + ["--vocab_size", "64", "--config_overrides", json.dumps({**overrides, "cross_config": tower})]
        )
    finally:
        transformers.logging.set_verbosity_warning()
        hub_logging.set_verbosity_warning()
    assert code == 0
    captured = capfd.readouterr()
    assert "pretraining" in captured.err and TOKEN not in captured.out + captured.err + caplog.text
    files = [path for path in output_dir.rglob("*") if path.is_file()]
    assert {"README.md", "config.json", "metrics.json", "model.safetensors"} <= {path.name for path in files}
    assert any(path.name == "optimizer.bin" for path in files)  # the checkpoints are searched too
    assert [path for path in files if TOKEN.encode() in path.read_bytes()] == []


# --- dataset paths -----------------------------------------------------------------------------------------------


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture
def cache_kwargs(tmp_path: Path) -> dict[str, str]:
    return {"cache_dir": str(tmp_path / "hf-cache")}


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE", "FILE_URL"])
def test_imagefolder_file_names_cannot_escape_the_folder(tmp_path, cache_kwargs, file_name):
    root = tmp_path / "data"
    _png(root / "inside.png")
    _png(tmp_path / "outside.png")
    outside = tmp_path / "outside.png"
    file_name = {"ABSOLUTE": str(outside), "FILE_URL": f"file://{outside}"}.get(file_name, file_name)
    rows = [{"file_name": "inside.png", "text": "fine"}, {"file_name": file_name, "text": "escapes"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match=r"Could not read the source .*data.*Invalid metadata file_name") as error:
        load_image_text_dataset(str(root), split="train", builder_kwargs=cache_kwargs)
    assert file_name in str(error.value)


@pytest.mark.parametrize("path", ["file:///etc/hostname", "http://example.com/x.png"])
def test_csv_image_paths_that_are_urls_are_refused(tmp_path, cache_kwargs, path):
    _png(tmp_path / "images" / "red.png")
    (tmp_path / "table.csv").write_text(f"image,text\nimages/red.png,fine\n{path},a url\n")
    with pytest.raises(ValueError, match=r"Row 1 \(counting from 0\) of .*table\.csv .*points outside the folder"):
        load_image_text_dataset(str(tmp_path / "table.csv"), split="train", builder_kwargs=cache_kwargs)


def _parquet_folder(root: Path, paths: list[str]) -> str:
    """A local parquet dataset whose images are stored as paths only (no bytes), written with pyarrow and datasets'
    feature metadata (datasets' own writer would fetch and embed the files)."""
    features = Features({"image": ImageFeature(decode=False), "text": Value("string")})
    table = pa.table(
        {"image": [{"bytes": None, "path": path} for path in paths], "text": [f"row {i}" for i in range(len(paths))]},
        schema=features.arrow_schema,
    )
    metadata = {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(metadata), root / "train.parquet")
    return str(root)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "relative_to_cwd", "url"])
def test_stored_image_paths_outside_a_local_dataset_are_refused(tmp_path, cache_kwargs, monkeypatch, kind):
    """A parquet dataset can store any path as an image; decoding would read that file (or fetch that URL), so
    paths outside the dataset's folder are refused when the dataset is loaded."""
    root = tmp_path / "data"
    _png(root / "images" / "inside.png")
    _png(tmp_path / "secret.png")
    monkeypatch.chdir(tmp_path)  # a relative path is opened from the working directory
    bad = {
        "absolute": str(tmp_path / "secret.png"),
        "dotdot": str(root / "images" / ".." / ".." / "secret.png"),
        "relative_to_cwd": "secret.png",
        "url": "https://example.com/secret.png",
    }[kind]
    folder = _parquet_folder(root, [str(root / "images" / "inside.png"), bad])
    with pytest.raises(
        ValueError, match=r"Row 1 \(counting from 0\) of source .*stores its image as the path"
    ) as error:
        load_image_text_dataset(folder, split="train", builder_kwargs=cache_kwargs)
    assert repr(bad) in str(error.value) and "outside the dataset's folder" in str(error.value)


def test_stored_image_paths_inside_a_local_dataset_load(tmp_path, cache_kwargs):
    root = tmp_path / "data"
    _png(root / "images" / "inside.png", (10, 20, 30))
    folder = _parquet_folder(root, [str(root / "images" / "inside.png")])
    dataset = with_lazy_decoding(load_image_text_dataset(folder, split="train", builder_kwargs=cache_kwargs))
    assert dataset[0]["image"].getpixel((0, 0)) == (10, 20, 30)


def test_a_symbolic_link_inside_the_folder_is_followed(tmp_path, cache_kwargs):
    """The documented choice: the check is lexical, as datasets' own imagefolder check. A link that the folder's
    owner placed inside it (e.g. images kept on a larger disk) is followed; `..`, absolute paths elsewhere and URLs
    are what a table or metadata file from elsewhere could use to escape, and those are refused."""
    _png(tmp_path / "elsewhere" / "red.png", (255, 0, 0))
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(tmp_path / "elsewhere", root / "images")
    (root / "table.csv").write_text("image,text\nimages/red.png,a red square\n")
    dataset = with_lazy_decoding(
        load_image_text_dataset(str(root / "table.csv"), split="train", builder_kwargs=cache_kwargs)
    )
    assert dataset[0]["image"].getpixel((0, 0)) == (255, 0, 0)
