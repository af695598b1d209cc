"""The architecture contracts of .importlinter: they hold, a broken one fails the check, and they are checked on the
package tree pyproject's `package-dir` builds (not on modeling_xmodal/ alone, which is all `lint-imports` sees)."""

from __future__ import annotations

import configparser
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "import_contracts.py"
CONFIG = REPO / ".importlinter"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _load_script() -> ModuleType:
    """.ci/import_contracts.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("import_contracts_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the check in a process of its own (import-linter configures logging and rich output globally)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    result.stdout = ANSI_ESCAPE.sub("", result.stdout)
    return result


def _module_file(contracts: ModuleType, root: Path, module: str) -> Path:
    """The source file of `module` in the repository at root, found through pyproject's mapping."""
    package, _, leaf = module.rpartition(".")
    return contracts.collect_packages(root)[package] / f"{leaf}.py"


def _append_line(path: Path, line: str) -> int:
    """Append line to the file at path; its line number."""
    text = path.read_text(encoding="utf-8")
    text = text if text.endswith("\n") or not text else text + "\n"
    path.write_text(text + line + "\n", encoding="utf-8")
    return text.count("\n") + 1


@pytest.fixture(scope="module")
def contracts() -> ModuleType:
    """The script's functions."""
    return _load_script()


@pytest.fixture(scope="module")
def staged(contracts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This repository's tree as the wheel lays it out, built once."""
    destination = tmp_path_factory.mktemp("staged")
    contracts.stage_tree(REPO, destination)
    return destination


@pytest.fixture(scope="module")
def clean_copy(contracts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of pyproject.toml and the .py files of every mapped folder, in their places."""
    copy = tmp_path_factory.mktemp("repo")
    shutil.copy2(REPO / "pyproject.toml", copy / "pyproject.toml")
    for folder in contracts.collect_packages(REPO).values():
        target = copy / folder.relative_to(REPO)
        target.mkdir(parents=True, exist_ok=True)
        for source in folder.glob("*.py"):
            shutil.copy2(source, target / source.name)
    return copy


def test_repo_contracts_are_kept() -> None:
    result = _run_script()
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "statement", "contract", "imported"),
    [
        pytest.param(
            "xmodal.modeling_xmodal",
            "import xmodal.training",
            "model-without-training",
            "xmodal.training",
            id="model-imports-training",
        ),
        pytest.param(
            "xmodal.configuration.configuration_xmodal",
            "import accelerate",
            "hub-bundle",
            "accelerate",
            id="bundle-imports-accelerate",
        ),
    ],
)
def test_a_broken_contract_fails_the_check_and_names_the_import(
    contracts: ModuleType, clean_copy: Path, tmp_path: Path, module: str, statement: str, contract: str, imported: str
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(clean_copy, root)
    line = _append_line(_module_file(contracts, root, module), statement)
    result = _run_script(str(CONFIG), "--root", str(root), "--contract", contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{module} -> {imported} (l.{line})" in result.stdout, result.stdout + result.stderr


def test_staged_tree_follows_package_dir(contracts: ModuleType, staged: Path) -> None:
    for package, folder in contracts.collect_packages(REPO).items():
        for source in folder.glob("*.py"):
            assert (staged.joinpath(*package.split(".")) / source.name).is_file(), (package, source)
    for path in (
        "__init__.py",
        "configuration/configuration_xmodal.py",
        "processing/processing_xmodal.py",
        "training/__init__.py",
    ):
        assert (staged / "xmodal" / path).is_file(), path


def test_unlisted_subpackages_follow_their_parent(contracts: ModuleType, tmp_path: Path) -> None:
    """Only folders with an __init__.py are subpackages; an explicit package-dir entry wins over the parent's."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "xmodal" = "model", "xmodal.extra" = "elsewhere" }\npackages = ["xmodal"]\n',
        encoding="utf-8",
    )
    for path in (
        "model/__init__.py",
        "model/inner/__init__.py",
        "model/inner/deep/__init__.py",
        "model/notes/x.py",
        "elsewhere/__init__.py",
        "elsewhere/sub/__init__.py",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("", encoding="utf-8")
    packages = contracts.collect_packages(tmp_path)
    assert packages == {
        "xmodal": tmp_path / "model",
        "xmodal.extra": tmp_path / "elsewhere",
        "xmodal.extra.sub": tmp_path / "elsewhere" / "sub",
        "xmodal.inner": tmp_path / "model" / "inner",
        "xmodal.inner.deep": tmp_path / "model" / "inner" / "deep",
    }


def test_xmodal_resolves_to_the_staged_tree_and_is_restored(contracts: ModuleType, staged: Path) -> None:
    imported_before = sys.modules.get("xmodal")
    with contracts.tree_first_on_path(staged):
        spec = importlib.util.find_spec("xmodal")
        assert spec is not None and Path(spec.origin).resolve() == (staged / "xmodal" / "__init__.py").resolve()
    assert sys.modules.get("xmodal") is imported_before


def test_the_installed_xmodal_is_refused(contracts: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(contracts.StagingError, match="not to the staged tree"):
        with contracts.tree_first_on_path(tmp_path):
            pass


def test_bundle_contract_covers_exactly_the_hub_bundle() -> None:
    """The allow-list contract checks the files xmodal.hub writes to the Hub, all of them and only them."""
    from xmodal.hub import BUNDLE_MODULES

    config = configparser.ConfigParser()
    config.read(CONFIG, encoding="utf-8")
    contract = config["importlinter:contract:hub-bundle"]
    for option in ("source_modules", "allowed_modules"):
        assert set(contract[option].split()) == set(BUNDLE_MODULES.values()), option
