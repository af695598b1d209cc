"""WebDataset tar shards as a pretraining source: finding the shards of a ``--dataset`` value, holding shards out for
evaluation, and giving each process shards of its own.

A WebDataset shard is a ``.tar`` file whose members are grouped into samples by their name up to the first dot:
``000042.jpg`` and ``000042.txt`` (or ``000042.json``) form the sample ``000042`` with the keys ``jpg`` and ``txt``.
The shards are read by the ``webdataset`` builder of :mod:`datasets` (``load_dataset("webdataset", data_files=...,
streaming=True)``), whose iterable datasets have one shard per tar file; :func:`load_image_text_dataset
<xmodal.training.data.load_image_text_dataset>` maps the keys to the ``image`` and ``text`` columns.

A source names its shards as (see :func:`webdataset_shards`):

* one ``.tar`` file;
* a pattern ending in ``.tar``: a glob (``shards/*.tar``), a brace range or list as open_clip's ``--train-data``
  takes (``shards/{00000..00009}.tar``, ``shards/{a,b}-{0..3}.tar``), or several of those joined by ``::``;
* a directory holding ``.tar`` files (at any depth). Shards whose file or folder names mark a split the way
  :mod:`datasets` reads them (``train-00000.tar``, ``validation/00000.tar``, ``test-00000.tar``, ...) form those
  splits; otherwise every shard is in the ``train`` split.

Only local files are resolved here; remote shards can be read with ``load_image_text_dataset("webdataset",
data_files=[...])``, which hands the list to :mod:`datasets` as it is.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping, Sequence

from datasets import IterableDataset
from datasets.data_files import DataFilesDict, get_data_patterns

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
"""The file suffix of a WebDataset shard."""

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""Sample keys searched, in this order, for the image when no image key is named."""

TEXT_KEYS = ("txt", "text")
"""Sample keys searched, in this order, for the caption when no caption key is named."""

JSON_CAPTION_FIELDS = ("json.caption", "json.text")
"""Fields of a sample's ``.json`` member searched for the caption after :data:`TEXT_KEYS`."""

_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_PATTERN_SEPARATOR = "::"


def _matching_brace(pattern: str, start: int) -> int:
    depth = 0
    for index in range(start, len(pattern)):
        if pattern[index] == "{":
            depth += 1
        elif pattern[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"The shard pattern {pattern!r} has a '{{' without its '}}'.")


def _split_alternatives(body: str) -> list[str]:
    """``a,{b,c},d`` -> ``["a", "{b,c}", "d"]`` (commas inside nested braces stay)."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[start:index])
            start = index + 1
    return [*parts, body[start:]]


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, in order, as webdataset's and open_clip's ``braceexpand`` gives them.

    ``{000..003}`` is a numeric range (zero-padded to the wider bound when a bound has a leading zero; descending
    when the first bound is larger), ``{a,b}`` a list of alternatives (which may hold braces themselves), and several
    groups multiply: ``s{0..1}-{a,b}.tar`` -> ``s0-a.tar, s0-b.tar, s1-a.tar, s1-b.tar``. A group that is neither
    (``{x}``) is kept as written.

    Raises:
        ValueError: a ``{`` has no matching ``}``.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = _matching_brace(pattern, start)
    head, body, tails = pattern[:start], pattern[start + 1 : end], expand_braces(pattern[end + 1 :])
    bounds = _RANGE.fullmatch(body)
    if bounds is not None:
        first, last = bounds.groups()
        padded = any(len(bound) > 1 and bound.startswith("0") for bound in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        options = [f"{number:0{width}d}" for number in range(int(first), int(last) + step, step)]
    else:
        alternatives = _split_alternatives(body)
        if len(alternatives) == 1:
            options = [f"{{{option}}}" for option in expand_braces(body)]
        else:
            options = [option for alternative in alternatives for option in expand_braces(alternative)]
    return [head + option + tail for option in options for tail in tails]


def _tar_files_under(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "**", f"*{SHARD_SUFFIX}"), recursive=True))


def is_webdataset_source(source: str) -> bool:
    """Whether ``source`` names WebDataset shards: a ``.tar`` file or pattern (each ``::`` part ending in ``.tar``),
    or an existing directory that holds ``.tar`` files."""
    if os.path.isdir(source):
        return bool(_tar_files_under(source))
    return all(part.lower().endswith(SHARD_SUFFIX) for part in source.split(_PATTERN_SEPARATOR))


def _shards_of_pattern(pattern: str, source: str) -> list[str]:
    files, missing = [], []
    for name in expand_braces(pattern):
        if glob.has_magic(name):
            matches = sorted(glob.glob(name))
            if not matches:
                missing.append(name)
            files.extend(matches)
        elif os.path.isfile(name):
            files.append(name)
        else:
            missing.append(name)
    if missing:
        raise ValueError(
            f"WebDataset source {source!r}: {len(missing)} of the shards it names do not exist or match no file "
            f"(e.g. {missing[:3]}). Accepted: a .tar file, a glob or brace pattern of .tar files "
            "('shards/{00000..00009}.tar'), several joined by '::', or a directory holding .tar files."
        )
    return files


def webdataset_shards(source: str) -> dict[str, list[str]]:
    """The shard files of a WebDataset source, per split: ``{"train": [...]}``, or the splits that the names of a
    directory's shards mark (see the module docstring). A file named twice is kept once, at its first place.

    Raises:
        ValueError: a named shard does not exist, a pattern matches no file, or a directory holds no ``.tar`` file;
            the message says what is accepted.
    """
    if os.path.isdir(source):
        if not _tar_files_under(source):
            raise ValueError(f"WebDataset source {source!r}: the directory holds no {SHARD_SUFFIX} file.")
        per_split = DataFilesDict.from_patterns(
            get_data_patterns(source), base_path=source, allowed_extensions=[SHARD_SUFFIX]
        )
        return {str(split): sorted(files) for split, files in per_split.items() if files}
    files = [file for part in source.split(_PATTERN_SEPARATOR) for file in _shards_of_pattern(part, source)]
    return {"train": list(dict.fromkeys(files))}


def hold_out_shards(
    shards: Mapping[str, Sequence[str]], train_split: str, splits: Sequence[str], where: str
) -> dict[str, list[str]]:
    """The splits of ``shards`` plus, for each of ``splits`` it lacks, the last shard of ``train_split`` (which
    training then no longer reads): the first split named takes the last shard, the next the one before, and so on.

    Whole shards are held out, not rows: every process can skip them without reading them, and a held-out split is
    the same whatever the number of processes.

    Raises:
        ValueError: ``train_split`` is not a split of ``shards``, or it would be left without a shard.
    """
    if train_split not in shards:
        raise ValueError(
            f"{where} has no split {train_split!r} (--train_split); its shards form the splits {list(shards)}."
        )
    result = {name: list(files) for name, files in shards.items()}
    train = result[train_split]
    for name in splits:
        if name in result:
            continue
        if len(train) < 2:
            raise ValueError(
                f"{where}: the {train_split!r} split has {len(train)} shard(s) left, too few to hold one out for the "
                f"{name!r} split and still train. Give more shards, or shards of that split: named like "
                f"'{name}-00000{SHARD_SUFFIX}' in the source directory."
            )
        result[name] = [train.pop()]
    return result


def shard_across_processes(dataset: IterableDataset, process_index: int, num_processes: int) -> IterableDataset:
    """This process's part of a sharded stream: shard ``i`` (of the epoch's order, shuffled alike on every process)
    goes to process ``i % num_processes``, so no two processes read the same shard. DataLoader workers then divide a
    process's shards among themselves (:mod:`datasets` gives each worker distinct shards).

    :func:`datasets.distributed.split_dataset_by_node` does the same when the number of shards is a multiple of the
    number of processes, and otherwise makes every process read every shard and keep one row in ``num_processes``.
    Here uneven counts are allowed instead, with a warning: some processes get one shard more, and an epoch of the
    training loop ends when the first process runs out of rows.

    Raises:
        ValueError: fewer shards than processes (a process would have none of its own).
    """
    if num_processes == 1:
        return dataset
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}.")
    num_shards = dataset.n_shards
    if num_shards < num_processes:
        raise ValueError(
            f"{num_shards} shard(s) for {num_processes} processes: each process reads shards of its own, so it needs "
            f"at least {num_processes} training shards (best a multiple of {num_processes} x --num_workers). Write "
            "the data as more, smaller shards, or run on fewer processes."
        )
    if num_shards % num_processes:
        low = num_shards // num_processes
        logger.warning(
            "%d training shards do not divide among %d processes: each reads %d or %d shards, and an epoch ends when "
            "the first process runs out (the others' last rows of that epoch are not trained on). A multiple of %d "
            "shards avoids this.",
            num_shards,
            num_processes,
            low,
            low + 1,
            num_processes,
        )
    return dataset.shard(num_shards=num_processes, index=process_index, contiguous=False)


__all__ = [
    "IMAGE_KEYS",
    "JSON_CAPTION_FIELDS",
    "SHARD_SUFFIX",
    "TEXT_KEYS",
    "expand_braces",
    "hold_out_shards",
    "is_webdataset_source",
    "shard_across_processes",
    "webdataset_shards",
]
