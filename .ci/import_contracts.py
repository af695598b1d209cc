"""Check xmodal's architecture contracts (.importlinter) with import-linter, on the package tree pyproject builds.

pyproject.toml maps the import package `xmodal` onto several top-level folders with setuptools `package-dir`
(`xmodal` -> modeling_xmodal/, `xmodal.configuration` -> configuration/, `xmodal.training` -> training/, ...).
Static import readers such as grimp, which import-linter uses, find `xmodal` in modeling_xmodal/ and never see the
other folders. So this script assembles the real tree `xmodal/...` in a temporary directory from that mapping (the
.py files of every mapped folder, and of every subfolder with an __init__.py, which follows its parent), puts that
directory first on sys.path and runs import-linter on it in-process, without a cache.

It also defines the contract type `allowed_imports` (AllowedImportsContract): its source modules may import only the
listed internal modules, the listed top-level external packages and the standard library. The .importlinter
registers it as `import_contracts.AllowedImportsContract`; this folder is put on sys.path for that.

Usage:  .venv/bin/python .ci/import_contracts.py [CONFIG] [--root REPO] [--contract ID ...] [--verbose]
Exit status: 0 when every contract is kept, 1 when one is broken (or import-linter fails), 2 when the tree cannot be
staged.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from importlinter import Contract, ContractCheck, fields, output
from importlinter.application.contract_utils import AlertLevel, remove_ignored_imports_and_report
from importlinter.domain.contract import InvalidContractOptions
from importlinter.domain.helpers import module_expressions_to_modules
from importlinter.domain.imports import Module

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

if TYPE_CHECKING:
    from grimp import ImportGraph

REPO_ROOT = Path(__file__).resolve().parent.parent
ROOT_PACKAGE = "xmodal"
EXIT_OK, EXIT_BROKEN, EXIT_STAGING = 0, 1, 2


class StagingError(RuntimeError):
    """The package tree could not be assembled from pyproject.toml, or it is not what import-linter would read."""


# --- the package tree ---------------------------------------------------------------------------------------------


def read_setuptools_layout(root: Path) -> tuple[dict[str, str], list[str]]:
    """Return `[tool.setuptools]` `package-dir` and `packages` of root/pyproject.toml."""
    if not (root / "pyproject.toml").is_file():
        raise StagingError(f"{root} has no pyproject.toml.")
    with open(root / "pyproject.toml", "rb") as file:
        setuptools = tomllib.load(file).get("tool", {}).get("setuptools", {})
    packages = setuptools.get("packages", [])
    if not isinstance(packages, list):  # `packages = {find = ...}`: only package-dir and subfolders are used.
        packages = []
    return dict(setuptools.get("package-dir", {})), list(packages)


def package_folder(package: str, package_dir: dict[str, str], root: Path) -> Path:
    """The folder setuptools builds `package` from: its longest mapped prefix (or "") plus the rest of its name."""
    parts = package.split(".")
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return root.joinpath(package_dir[prefix], *parts[cut:])
    return root.joinpath(*parts)


def collect_packages(root: Path) -> dict[str, Path]:
    """Map each package of the `xmodal` tree to its source folder, subpackages (folders with __init__.py) included."""
    package_dir, packages = read_setuptools_layout(root)
    declared = sorted({*package_dir, *packages} - {""})
    found = {name: package_folder(name, package_dir, root) for name in declared if name.split(".")[0] == ROOT_PACKAGE}
    if ROOT_PACKAGE not in found:
        found[ROOT_PACKAGE] = package_folder(ROOT_PACKAGE, package_dir, root)
    for name, folder in sorted(found.items()):
        if not folder.is_dir():
            raise StagingError(f"pyproject.toml maps {name} to {folder}, which is not a folder.")
    pending = sorted(found.items())
    while pending:
        name, folder = pending.pop()
        for child in sorted(folder.iterdir()):
            child_name = f"{name}.{child.name}"
            if child.is_dir() and (child / "__init__.py").is_file() and child_name not in found:
                found[child_name] = child
                pending.append((child_name, child))
    return dict(sorted(found.items()))


def stage_tree(root: Path, destination: Path) -> dict[str, Path]:
    """Copy the .py files of each package of root into destination/xmodal/..., where pyproject's mapping puts them.

    Returns the packages and their source folders. Raises StagingError where a mapped folder is missing or the
    root package has no __init__.py.
    """
    packages = collect_packages(root)
    for name, folder in packages.items():
        target = destination.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(folder.glob("*.py")):
            shutil.copy2(source, target / source.name)
    if not (destination / ROOT_PACKAGE / "__init__.py").is_file():
        raise StagingError(f"{packages[ROOT_PACKAGE]} has no __init__.py: {ROOT_PACKAGE} would not be a package.")
    return packages


@contextlib.contextmanager
def tree_first_on_path(staged: Path) -> Iterator[None]:
    """Put staged (and this folder, for the custom contract) first on sys.path, with no `xmodal` imported yet.

    Checks that `xmodal` is found in staged rather than the installed (editable) one; restores sys.path,
    sys.modules' xmodal entries and the working directory afterwards.
    """
    saved_path = list(sys.path)
    saved_modules = {name: module for name, module in sys.modules.items() if _is_root_module(name)}
    saved_cwd = os.getcwd()
    for name in saved_modules:
        del sys.modules[name]
    sys.path[:0] = [str(staged), str(Path(__file__).resolve().parent)]
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(ROOT_PACKAGE)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or staged.resolve() not in origin.parents:
            raise StagingError(f"{ROOT_PACKAGE} resolves to {origin}, not to the staged tree in {staged}.")
        os.chdir(staged)  # import-linter puts the working directory first on sys.path
        yield
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        for name in [name for name in sys.modules if _is_root_module(name)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        importlib.invalidate_caches()


def _is_root_module(name: str) -> bool:
    """Whether name is the root package or one of its modules."""
    return name == ROOT_PACKAGE or name.startswith(f"{ROOT_PACKAGE}.")


# --- the custom contract ------------------------------------------------------------------------------------------


class AllowedImportsContract(Contract):
    """Source modules import only allowed modules: an allow-list, where `forbidden` is a deny-list.

    Every direct import of each source module must be of a module in `allowed_modules` (internal modules, matched
    exactly; wildcards as in other contracts), of a top-level package in `allowed_external`, or, unless
    `allow_standard_library = False`, of the standard library (`sys.stdlib_module_names`). Lazy imports (inside
    functions) count; TYPE_CHECKING-only ones count unless `exclude_type_checking_imports = True` is set in
    [importlinter]. Needs `include_external_packages = True`, or the graph would hold no external imports to check.

    Options: source_modules, allowed_modules, allowed_external (optional), allow_standard_library (default True),
    ignore_imports, unmatched_ignore_imports_alerting (default "error"), broken_contract_guidance (optional).
    """

    type_name = "allowed_imports"

    source_modules = fields.SetField(subfield=fields.ModuleExpressionField())
    allowed_modules = fields.SetField(subfield=fields.ModuleExpressionField())
    allowed_external = fields.SetField(subfield=fields.StringField(), required=False)
    allow_standard_library = fields.BooleanField(default=True)
    ignore_imports = fields.SetField(subfield=fields.ImportExpressionField(), required=False)
    unmatched_ignore_imports_alerting = fields.EnumField(AlertLevel, default=AlertLevel.ERROR)
    broken_contract_guidance = fields.TextField(required=False)

    def validate(self) -> None:
        """Require a graph with external packages, and top-level names in `allowed_external`."""
        errors = {}
        if str(self.session_options.get("include_external_packages")).lower() != "true":
            errors["include_external_packages"] = "allowed_imports needs include_external_packages = True."
        dotted = sorted(name for name in self._allowed_external() if "." in name)
        if dotted:
            errors["allowed_external"] = f"Only top-level packages can be allowed, not {', '.join(dotted)}."
        if errors:
            raise InvalidContractOptions(errors)

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        """Collect every direct import of a source module that nothing allows."""
        removal = remove_ignored_imports_and_report(
            graph=graph,
            ignore_imports=self.ignore_imports,  # type: ignore[arg-type]
            unmatched_alerting=self.unmatched_ignore_imports_alerting,  # type: ignore[arg-type]
        )
        sources = self._modules(graph, self.source_modules)
        allowed = self._modules(graph, self.allowed_modules)
        violations = []
        for source in sorted(sources):
            output.verbose_print(verbose, f"Checking the imports of {source}...")
            for imported in sorted(graph.find_modules_directly_imported_by(source)):
                if not self._is_allowed(imported, allowed):
                    details = graph.get_import_details(importer=source, imported=imported)
                    line_numbers = sorted({detail["line_number"] for detail in details})
                    violations.append({"importer": source, "imported": imported, "line_numbers": line_numbers})
        return ContractCheck(
            kept=not violations,
            warnings=list(removal.warnings),
            ignored_import_count=removal.ignored_import_count,
            metadata={"violations": violations},
        )

    def render_broken_contract(self, check: ContractCheck) -> None:
        """One line per offending import: `importer -> imported (l.N)`, grouped by importer."""
        importer = None
        for violation in check.metadata["violations"]:
            if violation["importer"] != importer:
                if importer is not None:
                    output.new_line()
                importer = violation["importer"]
                output.print_error(f"{importer} imports what it is not allowed to:")
                output.new_line()
            lines = ", ".join(f"l.{number}" for number in violation["line_numbers"]) or "l.?"
            output.print_error(f"-   {violation['importer']} -> {violation['imported']} ({lines})", bold=False)
        output.new_line()
        external = ", ".join(sorted(self._allowed_external())) or "none"
        stdlib = "the standard library, " if self.allow_standard_library else ""
        output.print(f"Allowed: {stdlib}external packages {external}, and the contract's allowed_modules.")
        if self.broken_contract_guidance:
            output.new_line()
            output.print(str(self.broken_contract_guidance))

    def _is_allowed(self, imported: str, allowed: set[str]) -> bool:
        """Whether the import of `imported` (an internal module, or an external package squashed to its top level)."""
        top_level = imported.split(".")[0]
        if top_level in self.session_options["root_packages"]:
            return imported in allowed
        if top_level in self._allowed_external():
            return True
        return bool(self.allow_standard_library) and top_level in sys.stdlib_module_names

    def _allowed_external(self) -> set[str]:
        """The allowed top-level external packages."""
        return set(self.allowed_external or ())  # type: ignore[arg-type]

    @staticmethod
    def _modules(graph: ImportGraph, expressions: Any) -> set[str]:
        """The names of the modules the expressions match; an unknown module is an error, as in other contracts."""
        modules: set[Module] = module_expressions_to_modules(graph, expressions, raise_if_unmatched=True)
        return {module.name for module in modules}


# --- the command --------------------------------------------------------------------------------------------------


def run_contracts(config: Path, staged: Path, contracts: Sequence[str] = (), verbose: bool = False) -> int:
    """Run import-linter with config on the staged tree, without a cache; its exit status."""
    from importlinter import cli  # configures import-linter's settings on import

    saved_soft_wrap = output.console.soft_wrap
    output.console.soft_wrap = True  # one line per import, whatever the terminal width
    try:
        with tree_first_on_path(staged):
            return cli.lint_imports(
                config_filename=str(config), limit_to_contracts=tuple(contracts), no_cache=True, verbose=verbose
            )
    finally:
        output.console.soft_wrap = saved_soft_wrap


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", type=Path, help="import-linter config (default: ROOT/.importlinter)")
    parser.add_argument(
        "--root", type=Path, default=REPO_ROOT, help="repository with pyproject.toml (default: this one)"
    )
    parser.add_argument("--contract", action="append", default=[], help="check only this contract id (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="import-linter's verbose output")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Stage the tree of --root, check the contracts of the config on it; 0 when all are kept."""
    args = parse_args(argv)
    root = args.root.resolve()
    config = (args.config or root / ".importlinter").resolve()
    if not config.is_file():
        print(f"error: no import-linter config at {config}", file=sys.stderr)
        return EXIT_STAGING
    with tempfile.TemporaryDirectory(prefix="xmodal-contracts-") as tmp:
        staged = Path(tmp)
        try:
            packages = stage_tree(root, staged)
            print(f"Staged {len(packages)} packages of {ROOT_PACKAGE} from {root / 'pyproject.toml'} in {staged}")
            return run_contracts(config, staged, args.contract, args.verbose)
        except StagingError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_STAGING


if __name__ == "__main__":
    sys.modules.setdefault("import_contracts", sys.modules[__name__])  # the config's import_contracts.<Class>
    sys.exit(main())
