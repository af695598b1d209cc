"""The remote-code bundle: the flat files and the `auto_map` that let `AutoModel.from_pretrained(folder,
trust_remote_code=True)` load an xmodal checkpoint where xmodal is not installed.

The source lives in the package folders (`configuration/`, `modeling_xmodal/`, `processing/`); this module copies
each bundled module into the save folder under its flat name and rewrites its `from xmodal.<...>.<name> import`
lines into sibling imports (`from .<name> import`), the only form transformers' remote-code loader follows.
Inside a bundle the same code copies its own siblings unchanged, so a remotely loaded model saves a complete
bundle too.

This file is itself part of the bundle: it imports only the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Any

# flat file name (without .py) -> module in the installed package
BUNDLE_MODULES: dict[str, str] = {
    "configuration_xmodal": "xmodal.configuration.configuration_xmodal",
    "checks": "xmodal.checks",
    "outputs": "xmodal.outputs",
    "losses": "xmodal.losses",
    "layers": "xmodal.layers",
    "conversion": "xmodal.conversion",
    "towers": "xmodal.towers",
    "heads": "xmodal.heads",
    "modeling_base": "xmodal.modeling_base",
    "matching": "xmodal.matching",
    "modeling_tasks": "xmodal.modeling_tasks",
    "modeling_pretraining": "xmodal.modeling_pretraining",
    "modeling_xmodal": "xmodal.modeling_xmodal",
    "image_processing_xmodal": "xmodal.processing.image_processing_xmodal",
    "processing_xmodal": "xmodal.processing.processing_xmodal",
    "hub": "xmodal.hub",
}

# Every auto class an xmodal checkpoint can be loaded with -> "file.Class".
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_xmodal.XModalConfig",
    "AutoModel": "modeling_xmodal.XModalModel",
    "AutoModelForZeroShotImageClassification": "modeling_xmodal.XModalModel",
    "AutoModelForImageClassification": "modeling_xmodal.XModalForImageClassification",
    "AutoModelForPreTraining": "modeling_xmodal.XModalForPreTraining",
    "AutoModelForMaskedLM": "modeling_xmodal.XModalForMaskedLM",
    "AutoModelForImageTextToText": "modeling_xmodal.XModalForConditionalGeneration",
    "AutoModelForVisualQuestionAnswering": "modeling_xmodal.XModalForVisualQuestionAnswering",
    "AutoProcessor": "processing_xmodal.XModalProcessor",
    "AutoImageProcessor": "image_processing_xmodal.XModalImageProcessor",
}

_PACKAGE_IMPORT = re.compile(r"^(\s*)from\s+xmodal(?:\.\w+)*\.(\w+)\s+import\b", re.MULTILINE)
_ANY_PACKAGE_IMPORT = re.compile(r"^\s*(?:from|import)\s+xmodal\b", re.MULTILINE)


def _source_path(name: str) -> str | None:
    """Where the source of bundle file `name` is: the installed package's module, or, inside a loaded bundle, the
    sibling file (transformers may cache the modules of one bundle in several folders, so any loaded copy will do).
    None when a bundle file is neither beside this one nor loaded."""
    if __name__ == BUNDLE_MODULES["hub"]:
        spec = importlib.util.find_spec(BUNDLE_MODULES[name])
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"Cannot locate the source of {BUNDLE_MODULES[name]} for the remote-code bundle.")
        return spec.origin
    sibling = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    if os.path.isfile(sibling):
        return sibling
    for module_name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        is_bundle_copy = module_name.startswith("transformers_modules.") and module_name.endswith(f".{name}")
        if is_bundle_copy and path and os.path.isfile(path):
            return path
    return None


def bundle_source(name: str) -> str | None:
    """The text of the flat bundle file `name`.py: the module's source with package imports made sibling imports
    (None inside a loaded bundle that lacks that file).

    Raises:
        ValueError: if the module imports a part of xmodal that is not in the bundle.
    """

    def rewrite(match: re.Match) -> str:
        if match.group(2) not in BUNDLE_MODULES:
            raise ValueError(f"{name}.py imports xmodal module {match.group(2)!r}, which is not in the bundle.")
        return f"{match.group(1)}from .{match.group(2)} import"

    path = _source_path(name)
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        text = _PACKAGE_IMPORT.sub(rewrite, handle.read())
    if _ANY_PACKAGE_IMPORT.search(text):
        raise ValueError(f"{name}.py imports the xmodal package in a form the bundle cannot rewrite.")
    return text


def write_remote_code(save_directory: str | os.PathLike) -> list[str]:
    """Writes the flat remote-code files into `save_directory` (each atomically) and returns their paths.

    The `auto_map` entries are written by the savers themselves: `XModalConfig.save_pretrained` puts the complete
    `AUTO_MAP` in config.json, and the processors, registered with `register_for_auto_class`, get theirs (nested
    where transformers reads it) from transformers' own processor saving."""
    os.makedirs(save_directory, exist_ok=True)
    written = []
    for name in BUNDLE_MODULES:
        path = os.path.join(save_directory, f"{name}.py")
        text = bundle_source(name)
        if text is None:
            continue
        tmp_path = f"{path}.tmp"
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_path, path)
        written.append(path)
    return written


class RemoteCodeSaveMixin:
    """Makes `save_pretrained` (and so `push_to_hub`, which saves into a fresh folder first) also write the
    remote-code bundle. Put it first among the bases of a processor class."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        reject_push_in_save(kwargs.get("push_to_hub", False))
        result = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)
        return result


def reject_push_in_save(push_to_hub: bool) -> None:
    """transformers' `save_pretrained(push_to_hub=True)` uploads before the remote-code files are in place:
    refuse it and point to `push_to_hub`, which saves into a fresh folder and uploads all of it."""
    if push_to_hub:
        raise ValueError(
            "save_pretrained(..., push_to_hub=True) would upload an incomplete remote-code bundle; "
            "call .push_to_hub(repo_id) instead (it saves the complete folder, then uploads it)."
        )


__all__ = [
    "AUTO_MAP",
    "BUNDLE_MODULES",
    "RemoteCodeSaveMixin",
    "bundle_source",
    "reject_push_in_save",
    "write_remote_code",
]
