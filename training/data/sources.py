"""Image-text dataset sources for pretraining, all through Hugging Face :mod:`datasets`, with lazy image decoding that
skips and counts undecodable rows instead of crashing a run.

:func:`load_image_text_dataset` returns a ``Dataset``, ``DatasetDict``, ``IterableDataset`` or
``IterableDatasetDict`` whose rows have at least the columns ``image`` and ``text``. ``image`` is *not decoded*: it
holds ``{"bytes": ..., "path": ...}`` dicts (the feature is ``datasets.Image(decode=False)``), so that decoding runs
lazily in the DataLoader workers and can fail row by row. ``text`` holds a caption or a list of captions. Other columns
of the source are kept (for the synthetic source: ``captions``, ``questions``, ``answers``, ``label``, ...).

:func:`with_lazy_decoding` attaches an :class:`ImageTextDecoder` (``with_transform`` for map-style datasets, ``map``
for iterable ones). Each row it yields has ``image`` as an RGB ``PIL.Image.Image``, ``text`` as one caption (drawn at
random when the source holds several) and a marker ``row["_bad"]`` (:data:`BAD_ROW_MARKER`): ``None`` for a good row,
else a description ``"<path>: <error type>: <message>"`` of why the image (or caption) could not be read, with
``image`` set to ``None``. :class:`SkipBadRows` wraps a collator: it drops the marked rows, collates the rest and adds
a :class:`BadRows` report under ``batch["bad_rows"]`` (:data:`BAD_ROWS_KEY`). The training loop feeds the reports to
a :class:`BadRowCounter`, which raises once too many rows were bad.

Intended usage in a training loop::

    from xmodal.training.data import (
        BAD_ROWS_KEY, BadRowCounter, SkipBadRows, load_image_text_dataset, with_lazy_decoding,
    )

    raw = load_image_text_dataset("../shared/data/emoji-google", split="train", text_column="name")
    train = with_lazy_decoding(raw)
    loader = DataLoader(train, batch_size=32, shuffle=True, num_workers=4, collate_fn=SkipBadRows(collator))
    bad_rows = BadRowCounter(max_bad_row_fraction=args.max_bad_row_fraction)
    for batch in loader:
        report = batch.pop(BAD_ROWS_KEY)
        bad_rows.update(report.num_rows, report.num_bad, report.descriptions)  # raises past the threshold
        if not batch:  # every row of this batch was bad: nothing to train on
            continue
        loss = model(**batch).loss
        ...
    logger.info(bad_rows.summary())

For streaming, pass ``streaming=True, shuffle_buffer_size=...`` to :func:`load_image_text_dataset`, drop
``shuffle=True`` from the DataLoader and call ``train.set_epoch(epoch)`` at each epoch to reshuffle. The tokenizer
can be trained on the undecoded ``raw["text"]`` (a list of captions per row when the source has several).

Randomness: the caption of a row with several captions is drawn with torch's global RNG on every access. The
DataLoader seeds that RNG in each worker process with ``base_seed + worker_id`` (``base_seed`` drawn from the
DataLoader's ``generator``), and in the main process (``num_workers=0``) it is whatever ``torch.manual_seed`` or
``accelerate.utils.set_seed`` set: a seeded run draws the same captions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    IterableDataset,
    IterableDatasetDict,
    LargeList,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
)
from datasets import Image as ImageFeature
from datasets.data_files import DataFilesDict, sanitize_patterns
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from xmodal.processing.image_processing_xmodal import _pil_to_hwc

from .synthetic import make_synthetic_dataset
from .webdataset import IMAGE_KEYS, JSON_CAPTION_FIELDS, TEXT_KEYS, is_webdataset_source, webdataset_shards

IMAGE_COLUMN = "image"
"""Name of the image column in every dataset returned by :func:`load_image_text_dataset`."""

TEXT_COLUMN = "text"
"""Name of the caption column (a string, or a list of strings) in every dataset returned here."""

BAD_ROW_MARKER = "_bad"
"""Key added to each decoded row: ``None`` for a good row, else why it could not be decoded."""

BAD_ROWS_KEY = "bad_rows"
"""Key of the :class:`BadRows` report in each batch made by :class:`SkipBadRows`."""

TABLE_SUFFIXES: dict[str, str] = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
"""File suffixes of caption tables (image path + caption per row) and the :mod:`datasets` builder reading them."""

AnyDataset = Dataset | DatasetDict | IterableDataset | IterableDatasetDict
DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]]

_ACCEPTED_SOURCES = (
    "'synthetic' (the embedded procedural dataset); a .csv, .tsv, .json or .jsonl file of image paths and captions "
    "(or 'csv' / 'json' with data_files=); WebDataset .tar shards: a .tar file, a glob or brace pattern such as "
    "'shards/{00000..00009}.tar', or a directory of .tar files (or 'webdataset' with data_files=); an existing local "
    "dataset directory, e.g. an imagefolder with metadata.jsonl; or a dataset name on the Hugging Face Hub (or a "
    "datasets builder name such as 'imagefolder' or 'parquet' with data_files=)"
)
_STRING_DTYPES = ("string", "large_string")
_PIXEL_DECODER = ImageFeature()  # reads bytes or (local or remote) paths, fully loads, applies the EXIF orientation


def _is_caption_feature(feature: object) -> bool:
    """Whether a feature holds one caption (a string) or several (a list of strings)."""
    if isinstance(feature, (List, LargeList)):
        feature = feature.feature
    return isinstance(feature, Value) and feature.dtype in _STRING_DTYPES


def _check_columns(columns: Sequence[str], image_column: str, text_column: str, where: str) -> None:
    for argument, column in (("image_column", image_column), ("text_column", text_column)):
        if column not in columns:
            raise ValueError(
                f"{where} has no column {column!r} ({argument}={column!r}); available columns: {list(columns)}."
            )


def _resolve_image_paths(
    batch: dict[str, list[Any]], indices: list[int], column: str, root: str, data_file: str
) -> dict[str, list[str | None]]:
    """Make the image paths of a caption table absolute (relative ones against ``root``), rejecting any outside it.

    Empty cells become ``None`` (reported as a bad row when decoded).
    """
    resolved: list[str | None] = []
    for index, path in zip(indices, batch[column]):
        if not path:
            resolved.append(None)
            continue
        # lexical check, as datasets' imagefolder does (see _inside_root)
        full = os.path.normpath(os.path.join(root, path))
        if "://" in path or os.path.commonpath([root, full]) != root:
            raise ValueError(
                f"Row {index} (counting from 0) of {data_file} ({column}={path!r}) points outside the folder of its "
                f"table, {root}: image paths must be relative to that folder (no '..' escaping it, no URL) or "
                "absolute paths inside it."
            )
        resolved.append(full)
    return {column: resolved}


def _inside_root(folders: Sequence[str], path: str) -> bool:
    """Whether a stored image path names a file inside one of `folders` (a dataset's folder as given and as its real
    path, both absolute and normalised). A relative path counts from the working directory, where decoding would
    open it.

    The check is lexical, like datasets' own check of imagefolder `file_name`s: `..` and absolute paths elsewhere
    escape, a symbolic link inside the folder is followed (the folder's owner placed it; resolving every link would
    also refuse the common layout of an image folder linked from a larger disk). URLs escape too, except datasets'
    archive members `zip://<member>::<archive>` whose archive is inside the folder."""
    if "::" in path and path.startswith("zip://"):
        path = path.rsplit("::", 1)[-1]
    if "://" in path:
        return False
    full = os.path.abspath(path)
    return any(os.path.commonpath([folder, full]) == folder for folder in folders)


def _check_stored_image_paths(dataset: Dataset, root: str, where: str) -> None:
    """Refuses a local dataset whose images are stored as paths (no bytes) outside its folder `root`: a parquet or
    JSON dataset can hold any path, and decoding would read that file (or fetch that URL)."""
    column = dataset.data.column(IMAGE_COLUMN)
    if not pa.types.is_struct(column.type) or column.type.get_field_index("path") < 0:
        return
    folders = sorted({root, os.path.realpath(root)})
    start = 0
    for chunk in column.chunks:
        fields = dict(zip((field.name for field in chunk.type), chunk.flatten()))
        paths = fields["path"]
        path_only = pc.is_valid(paths)
        if "bytes" in fields:
            path_only = pc.and_(path_only, pc.is_null(fields["bytes"]))
        # the vectorised test passes the usual case (paths under the folder without '..'); the rest is checked exactly
        under = [pc.starts_with(paths, os.path.join(folder, "")) for folder in folders]
        plain = pc.and_(under[0] if len(under) == 1 else pc.or_(*under), pc.invert(pc.match_substring(paths, "..")))
        suspicious = pc.fill_null(pc.and_(path_only, pc.invert(plain)), False)
        for index in pc.indices_nonzero(suspicious).to_pylist():
            path = paths[index].as_py()
            if not _inside_root(folders, path):
                raise ValueError(
                    f"Row {start + index} (counting from 0) of {where} stores its image as the path {path!r}, outside "
                    f"the dataset's folder {root}: images stored by path must lie inside that folder."
                )
        start += len(chunk)


def _load_table_file(
    builder: str, data_file: str, image_column: str, text_column: str, builder_kwargs: dict[str, Any]
) -> Dataset:
    """One caption table as a Dataset whose image column is an ``Image(decode=False)`` feature."""
    kwargs = {"sep": "\t", **builder_kwargs} if data_file.endswith(".tsv") else builder_kwargs
    try:
        table = load_dataset(builder, data_files=[data_file], split="train", **kwargs)
    except ValueError as error:  # what datasets raises for a table without rows
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"The table {data_file} has no rows.") from error
    _check_columns(table.column_names, image_column, text_column, f"The table {data_file}")
    feature = table.features[image_column]
    if isinstance(feature, Value) and feature.dtype in _STRING_DTYPES:
        root = os.path.dirname(os.path.abspath(data_file))
        table = table.map(
            _resolve_image_paths,
            batched=True,
            with_indices=True,
            fn_kwargs={"column": image_column, "root": root, "data_file": data_file},
            desc=f"Checking the image paths of {os.path.basename(data_file)}",
        ).cast_column(image_column, ImageFeature(decode=False))
    elif not isinstance(feature, ImageFeature):
        raise TypeError(
            f"Column {image_column!r} of {data_file} must hold image paths (strings), got the feature {feature}."
        )
    return table


def _load_tables(
    builder: str,
    data_files: DataFiles,
    split: str | None,
    image_column: str,
    text_column: str,
    builder_kwargs: dict[str, Any],
) -> Dataset | DatasetDict:
    """Caption tables, loaded file by file so that each file's image paths resolve against its own folder."""
    if isinstance(data_files, Sequence) and not isinstance(data_files, str):
        data_files = list(data_files)
    elif isinstance(data_files, Mapping):
        data_files = dict(data_files)
    files_per_split = DataFilesDict.from_patterns(sanitize_patterns(data_files), base_path=os.getcwd())
    if split is not None:
        if split not in files_per_split:
            raise ValueError(f"Unknown split {split!r}: data_files has the splits {list(files_per_split)}.")
        files_per_split = {split: files_per_split[split]}
    splits = {}
    for name, files in files_per_split.items():
        remote = [file for file in files if "://" in file]
        if remote:
            raise ValueError(f"Caption tables must be local files (their image paths are local), got {remote}.")
        tables = [_load_table_file(builder, file, image_column, text_column, builder_kwargs) for file in files]
        splits[name] = tables[0] if len(tables) == 1 else concatenate_datasets(tables)
    return splits[split] if split is not None else DatasetDict(splits)


def _normalise(
    dataset: Dataset | IterableDataset, image_column: str, text_column: str, where: str
) -> Dataset | IterableDataset:
    """Check the columns, leave images undecoded and rename the chosen columns to ``image`` and ``text``.

    Columns already named ``image`` or ``text`` that were not chosen are dropped (they are replaced).
    """
    if isinstance(dataset, IterableDataset):
        first = next(iter(dataset), None)  # streaming builders may only know their schema once reading
        if first is None:
            raise ValueError(f"{where} has no rows.")
        columns = list(dataset.features or first)
    else:
        if len(dataset) == 0:
            raise ValueError(f"{where} has no rows.")
        columns = dataset.column_names
    _check_columns(columns, image_column, text_column, where)
    if dataset.features is not None:
        image_feature, text_feature = dataset.features[image_column], dataset.features[text_column]
        if not isinstance(image_feature, ImageFeature):
            hint = (
                "; for image paths, load the CSV or JSON-lines file itself as the source"
                if isinstance(image_feature, Value) and image_feature.dtype in _STRING_DTYPES
                else ""
            )
            raise TypeError(
                f"Column {image_column!r} of {where} must be a datasets.Image feature, got {image_feature}{hint}."
            )
        if not _is_caption_feature(text_feature):
            raise TypeError(
                f"Column {text_column!r} of {where} must hold a caption (string) or a list of captions, "
                f"got the feature {text_feature}."
            )
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    replaced = [name for name, chosen in ((IMAGE_COLUMN, image_column), (TEXT_COLUMN, text_column)) if name != chosen]
    dataset = dataset.remove_columns([name for name in replaced if name in columns])
    return dataset.rename_columns(
        {old: new for old, new in ((image_column, IMAGE_COLUMN), (text_column, TEXT_COLUMN)) if old != new}
    )


def _json_field(value: object, field: str, column: str) -> dict[str, Any]:
    """``{column: value[field]}`` for a decoded JSON member (``None`` when the member or the field is missing)."""
    return {column: value.get(field) if isinstance(value, Mapping) else None}


def _json_path(features: Features, name: str) -> tuple[str, str] | None:
    """``(key, field)`` when ``name`` is ``"<key>.<field>"`` for a JSON member ``key`` of the samples with that field."""
    for key, feature in features.items():
        if isinstance(feature, dict) and name.startswith(f"{key}.") and name[len(key) + 1 :] in feature:
            return key, name[len(key) + 1 :]
    return None


def _webdataset_columns(
    dataset: Dataset | IterableDataset, image_column: str, text_column: str, where: str
) -> tuple[Dataset | IterableDataset, str, str]:
    """The keys of WebDataset samples that hold the image and the caption, for :func:`_normalise`.

    A key named by ``image_column`` / ``text_column`` is used as it is; left at their defaults (``"image"``,
    ``"text"``) and absent from the samples, they stand for the first of :data:`IMAGE_KEYS`, and the first of
    :data:`TEXT_KEYS` and :data:`JSON_CAPTION_FIELDS`, that the samples have. A caption field of a JSON member
    (``"json.caption"``) is copied into a column of that name.
    """
    features = dataset.features
    keys = [name for name in features if not name.startswith("__")]
    fields = [f"{key}.{field}" for key in keys if isinstance(features[key], dict) for field in features[key]]
    found = {}
    for argument, requested, default, candidates, names in (
        ("image_column", image_column, IMAGE_COLUMN, IMAGE_KEYS, keys),
        ("text_column", text_column, TEXT_COLUMN, TEXT_KEYS + JSON_CAPTION_FIELDS, keys + fields),
    ):
        searched = candidates if requested == default and requested not in names else (requested,)
        found[argument] = next((name for name in searched if name in names), None)
        if found[argument] is None:
            what = "image" if argument == "image_column" else "caption"
            missing = (
                f"none of the {what} keys searched by default, {list(candidates)}"
                if requested == default
                else f"no {what} key {requested!r} ({argument}={requested!r})"
            )
            accepted = (
                f"an image key of the samples (searched by default: {', '.join(IMAGE_KEYS)})"
                if argument == "image_column"
                else f"a text key of the samples, or a field of a JSON member as '<key>.<field>' (searched by default: "
                f"{', '.join(TEXT_KEYS + JSON_CAPTION_FIELDS)})"
            )
            raise ValueError(
                f"{where} has {missing}; its samples have the keys {keys}"
                + (f" and the JSON fields {fields}" if fields else "")
                + f". Name the {what} with --{argument} ({argument}=): {accepted}."
            )
    text_key = found["text_column"]
    if text_key not in features:
        key, field = _json_path(features, text_key)
        dataset = dataset.map(
            functools.partial(_json_field, field=field, column=text_key),
            input_columns=key,
            features=Features({**features, text_key: features[key][field]}),
        )
    return dataset, found["image_column"], text_key


def _to_iterable(dataset: Dataset, num_shards: int) -> IterableDataset:
    return dataset.to_iterable_dataset(num_shards=min(num_shards, len(dataset)))


def _classify_source(source: str) -> str:
    """One of "synthetic", "webdataset", "table", "directory" or "hub" (a Hub name or a datasets builder name)."""
    if source == "synthetic":
        return "synthetic"
    if source == "webdataset" or is_webdataset_source(source):
        return "webdataset"
    if source in set(TABLE_SUFFIXES.values()) or os.path.isfile(source):
        return "table"
    if os.path.isdir(source):
        return "directory"
    if os.path.splitext(source)[1].lower() in TABLE_SUFFIXES:
        raise ValueError(f"Unknown source {source!r}: no such file. Accepted sources: {_ACCEPTED_SOURCES}.")
    try:
        validate_repo_id(source)
    except HFValidationError as error:
        raise ValueError(
            f"Unknown source {source!r}: not an existing file or directory, nor a valid dataset name. "
            f"Accepted sources: {_ACCEPTED_SOURCES}."
        ) from error
    return "hub"


def load_image_text_dataset(
    source: str = "synthetic",
    *,
    split: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    data_files: DataFiles | None = None,
    streaming: bool = False,
    shuffle_buffer_size: int | None = None,
    shuffle_seed: int = 0,
    num_shards: int = 64,
    builder_kwargs: Mapping[str, Any] | None = None,
) -> AnyDataset:
    """Load an image-text dataset with undecoded images, normalised to the columns ``image`` and ``text``.

    Sources:

    * ``"synthetic"``: :func:`~xmodal.training.data.make_synthetic_dataset` called with ``builder_kwargs`` (e.g.
      ``{"num_train": 800, "num_validation": 100, "num_test": 100, "seed": 0, "image_size": 64}``); its ``text``
      is one caption, ``text_column="captions"`` gives all of them.
    * a caption table: a ``.csv``, ``.tsv``, ``.json`` or ``.jsonl`` file (or ``"csv"`` / ``"json"`` with
      ``data_files``: paths, glob patterns, or a dict split -> paths) whose ``image_column`` holds image paths.
      Relative paths resolve against the folder of the file that holds them; a path that leaves that folder
      (``..``, an absolute path elsewhere, a URL) raises a ``ValueError`` naming the file and the row (a symbolic
      link inside the folder is followed, see the directory source). JSON captions may be lists of strings.
    * WebDataset ``.tar`` shards (see :mod:`~xmodal.training.data.webdataset`): a ``.tar`` file, a glob or brace
      pattern (``"shards/{00000..00009}.tar"``, several joined by ``::``), a directory holding ``.tar`` files (its
      split-named shards, ``train-00000.tar``, ``test-00000.tar``, ..., form splits), or ``"webdataset"`` with
      ``data_files``; read by the ``webdataset`` builder of :mod:`datasets`, one shard per tar file when streaming.
      ``image_column`` / ``text_column`` name sample keys (``"png"``, ``"txt"``) or a JSON member's field
      (``"json.caption"``); left at their defaults, the first of ``jpg``, ``jpeg``, ``png``, ``webp`` and the first of
      ``txt``, ``text``, ``json.caption``, ``json.text`` are taken. The other keys stay columns (``__key__``,
      ``__url__``: the sample's name and shard).
    * an existing local directory: anything :func:`datasets.load_dataset` reads from a folder, e.g. an imagefolder
      (images plus ``metadata.jsonl`` with ``file_name`` and caption fields). Images stored as paths (imagefolder
      ``file_name``s, path-only images of parquet or JSON files) must lie inside the folder: ``..``, absolute paths
      elsewhere and URLs raise a ``ValueError``. The check is lexical: a symbolic link inside the folder is followed.
    * any other name: :func:`datasets.load_dataset` (a Hub dataset, or a builder such as ``"imagefolder"`` or
      ``"parquet"`` with ``data_files``) whose ``image_column`` is a :class:`datasets.Image` feature.

    The chosen columns are renamed to ``image`` and ``text``; a column already named ``image`` or ``text`` that was
    not chosen is dropped, and every other column is kept. Images stay encoded (``datasets.Image(decode=False)``):
    decode them lazily with :func:`with_lazy_decoding`.

    Args:
        source: where the data comes from (see above).
        split: a split name to get one split, or ``None`` to get every split as a dict.
        image_column: the source's column of images (or image paths, for caption tables).
        text_column: the source's column of captions: a string, or a list of strings (one is drawn per access).
        data_files: data files for caption tables and for :func:`datasets.load_dataset`.
        streaming: return an ``IterableDataset`` (dict). "synthetic", caption tables and local directories are
            loaded and then converted with ``to_iterable_dataset``; WebDataset shards and other sources stream with
            ``load_dataset(..., streaming=True)``.
        shuffle_buffer_size: with ``streaming``, shuffle through a buffer of this many rows (and shuffle the shard
            order); call ``set_epoch(epoch)`` on the result to reshuffle every epoch.
        shuffle_seed: seed of the streaming shuffle.
        num_shards: with ``streaming`` on loaded data, the number of shards (capped at the number of rows): up to
            this many DataLoader workers read in parallel, and the shuffle permutes them.
        builder_kwargs: keyword arguments of :func:`make_synthetic_dataset` for "synthetic", else of
            :func:`datasets.load_dataset` (``name``, ``revision``, ``cache_dir``, ``data_dir``, ``sep``, ...).

    Returns:
        A ``Dataset`` (``split`` given) or ``DatasetDict``; with ``streaming``, an ``IterableDataset`` or
        ``IterableDatasetDict``. Rows: ``image`` (``{"bytes": bytes | None, "path": str | None}``), ``text``
        (``str`` or ``list[str]``) and the source's other columns.

    Raises:
        ValueError: unknown source (the message lists the accepted ones), unknown split, missing column (the message
            lists the available ones), an empty dataset or split, an image path outside its table's or its
            directory's folder, or streaming options without ``streaming=True``.
        TypeError: the image or caption column does not hold images or captions.
    """
    if shuffle_buffer_size is not None:
        if not streaming:
            raise ValueError(
                "shuffle_buffer_size applies to streaming=True; map-style datasets are shuffled by the DataLoader."
            )
        if shuffle_buffer_size < 1:
            raise ValueError(f"shuffle_buffer_size must be at least 1, got {shuffle_buffer_size}.")
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}.")
    if image_column == text_column:
        raise ValueError(f"image_column and text_column must differ, both are {image_column!r}.")
    kind = _classify_source(source)
    kwargs = dict(builder_kwargs or {})
    where = f"Source {source!r}" + (f", split {split!r}" if split is not None else "")
    if kind == "synthetic":
        dataset: AnyDataset = make_synthetic_dataset(**kwargs)
        if split is not None:
            if split not in dataset:
                raise ValueError(f"Unknown split {split!r} of source 'synthetic'; splits: {list(dataset)}.")
            dataset = dataset[split]
    elif kind == "table":
        builder = TABLE_SUFFIXES.get(os.path.splitext(source)[1].lower())
        if builder is not None:  # a file
            if data_files is not None:
                raise ValueError(f"Pass either a table file as source ({source!r}) or data_files, not both.")
            data_files = source
        elif os.path.isfile(source):
            raise ValueError(
                f"Unknown source {source!r}: unsupported file type (accepted: {', '.join(TABLE_SUFFIXES)}). "
                f"Accepted sources: {_ACCEPTED_SOURCES}."
            )
        elif data_files is None:
            raise ValueError(f"source={source!r} needs data_files: the {source.upper()} files to read.")
        else:
            builder = source
        dataset = _load_tables(builder, data_files, split, image_column, text_column, kwargs)
    else:
        builder = source
        if kind == "webdataset" and source != "webdataset":
            if data_files is not None:
                raise ValueError(f"Pass either WebDataset shards as source ({source!r}) or data_files, not both.")
            builder, data_files = "webdataset", webdataset_shards(source)
        load_streaming = streaming and kind in ("hub", "webdataset")
        try:
            dataset = load_dataset(builder, data_files=data_files, split=split, streaming=load_streaming, **kwargs)
        except DatasetNotFoundError as error:
            raise ValueError(f"Unknown source {source!r}: {error} Accepted sources: {_ACCEPTED_SOURCES}.") from error
        except DatasetGenerationError as error:
            # datasets wraps what went wrong (e.g. an imagefolder `file_name` escaping the folder) in a generic error
            if isinstance(error.__cause__, ValueError):
                raise ValueError(f"Could not read the source {source!r}: {error.__cause__}") from error
            raise

    def normalise(part: Dataset | IterableDataset, where: str) -> Dataset | IterableDataset:
        if kind != "webdataset":
            return _normalise(part, image_column, text_column, where)
        return _normalise(*_webdataset_columns(part, image_column, text_column, where), where)

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        dataset = type(dataset)({name: normalise(part, f"{where}, split {name!r}") for name, part in dataset.items()})
    else:
        dataset = normalise(dataset, where)
    if kind == "directory":
        root = os.path.normpath(os.path.abspath(source))
        parts = dataset.items() if isinstance(dataset, DatasetDict) else [(split, dataset)]
        for name, part in parts:
            _check_stored_image_paths(part, root, f"source {source!r}" + (f", split {name!r}" if name else ""))
    if streaming and isinstance(dataset, Dataset):
        dataset = _to_iterable(dataset, num_shards)
    elif streaming and isinstance(dataset, DatasetDict):
        dataset = IterableDatasetDict({name: _to_iterable(split, num_shards) for name, split in dataset.items()})
    if shuffle_buffer_size is not None:
        dataset = dataset.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer_size)
    return dataset


def _describe_image(value: object) -> str:
    """Where an undecoded image comes from, for error reports: its path, else its size in bytes."""
    if isinstance(value, Mapping):
        if value.get("path"):
            return str(value["path"])
        if value.get("bytes") is not None:
            return f"<{len(value['bytes'])} bytes of image data>"
    return "<no image>"


def _decode_rgb(value: Mapping[str, Any] | PIL.Image.Image | None) -> PIL.Image.Image:
    """Decode ``{"bytes", "path"}`` (or pass a decoded image through) to RGB, transparency composited on white and
    16-bit data scaled (not clipped), as :class:`~xmodal.XModalImageProcessor` converts images."""
    if value is None:
        raise ValueError("the row has no image")
    image = _PIXEL_DECODER.decode_example(value)
    return image if image.mode == "RGB" else PIL.Image.fromarray(_pil_to_hwc(image, convert_rgb=True))


def _pick_caption(text: str | Sequence[str] | None) -> str:
    if isinstance(text, str):
        return text
    if not text:
        raise ValueError(f"the row has no caption (text={text!r})")
    return text[int(torch.randint(len(text), ()))]  # torch's RNG: seeded per DataLoader worker


class ImageTextDecoder:
    """Lazy decoding of rows from :func:`load_image_text_dataset`, marking rows that cannot be decoded.

    ``image`` (``{"bytes", "path"}``) becomes an RGB ``PIL.Image.Image`` (any PIL mode: palette with transparency,
    ``LA`` and ``RGBA`` composited on white, ``I;16`` scaled to 8 bits, ``CMYK``, ...; EXIF orientation applied);
    ``text`` becomes one caption, drawn with torch's RNG when the row holds a list. A row whose image cannot be read
    (missing or zero-byte file, corrupt or truncated data, no image) or that has no caption gets ``image=None`` and
    ``row["_bad"]`` set to ``"<path or size>: <error type>: <message>"``; good rows have ``row["_bad"] = None``.

    Picklable, so it runs inside DataLoader worker processes. Use :func:`with_lazy_decoding` to attach it.
    """

    def _decode(self, image: Any, text: Any) -> tuple[PIL.Image.Image | None, str | None, str | None]:
        try:
            caption = _pick_caption(text)
            decoded = _decode_rgb(image)
        # Pillow and its plugins raise many types for bad data (OSError, SyntaxError, ValueError, EOFError,
        # struct.error, zlib.error, DecompressionBombError, ...): every one marks the row as bad.
        except Exception as error:
            return None, None, f"{_describe_image(image)}: {type(error).__name__}: {error}"
        return decoded, caption, None

    def _require_columns(self, columns: Sequence[str]) -> None:
        missing = [name for name in (IMAGE_COLUMN, TEXT_COLUMN) if name not in columns]
        if missing:
            raise ValueError(
                f"ImageTextDecoder needs the columns {IMAGE_COLUMN!r} and {TEXT_COLUMN!r} (as made by "
                f"load_image_text_dataset); missing {missing}, available columns: {list(columns)}."
            )

    def decode_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Decode one row (for ``IterableDataset.map``); the other columns are passed through."""
        self._require_columns(list(row))
        image, text, bad = self._decode(row[IMAGE_COLUMN], row[TEXT_COLUMN])
        return {**row, IMAGE_COLUMN: image, TEXT_COLUMN: text, BAD_ROW_MARKER: bad}

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Decode a batch of columns (for ``Dataset.with_transform``); the other columns are passed through."""
        self._require_columns(list(batch))
        decoded = [self._decode(image, text) for image, text in zip(batch[IMAGE_COLUMN], batch[TEXT_COLUMN])]
        images, texts, bad = (list(column) for column in zip(*decoded)) if decoded else ([], [], [])
        return {**batch, IMAGE_COLUMN: images, TEXT_COLUMN: texts, BAD_ROW_MARKER: bad}


def with_lazy_decoding(dataset: AnyDataset, decoder: ImageTextDecoder | None = None) -> AnyDataset:
    """Attach ``decoder`` (default :class:`ImageTextDecoder`) so that rows are decoded on access.

    Map-style datasets get it with ``with_transform`` (replacing any earlier transform; random access decodes one
    row, the DataLoader's batched access decodes a batch in one call), iterable ones with ``map``; dataset dicts get
    it on every split. The returned rows carry the ``_bad`` marker (:data:`BAD_ROW_MARKER`).
    """
    decoder = decoder if decoder is not None else ImageTextDecoder()
    if isinstance(dataset, (Dataset, DatasetDict)):
        return dataset.with_transform(decoder)
    if isinstance(dataset, (IterableDataset, IterableDatasetDict)):
        return dataset.map(decoder.decode_row)
    raise TypeError(
        "with_lazy_decoding expects a datasets Dataset, DatasetDict, IterableDataset or IterableDatasetDict, got "
        f"{type(dataset).__name__}."
    )


def split_bad_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Separate decoded rows into good rows (without the ``_bad`` marker) and the descriptions of the bad ones.

    Raises:
        ValueError: a row has no ``_bad`` marker (the dataset was not wrapped with :func:`with_lazy_decoding`).
    """
    good, bad = [], []
    for row in rows:
        if BAD_ROW_MARKER not in row:
            raise ValueError(
                f"Row without the {BAD_ROW_MARKER!r} marker (columns {list(row)}): wrap the dataset with "
                "with_lazy_decoding() before batching."
            )
        if row[BAD_ROW_MARKER] is None:
            good.append({key: value for key, value in row.items() if key != BAD_ROW_MARKER})
        else:
            bad.append(row[BAD_ROW_MARKER])
    return good, bad


class BadRows(NamedTuple):
    """What :class:`SkipBadRows` dropped from one batch: the batch's size before dropping, and why each row went."""

    num_rows: int
    descriptions: tuple[str, ...]

    @property
    def num_bad(self) -> int:
        return len(self.descriptions)


class SkipBadRows:
    """Collator wrapper: drops the rows marked bad, collates the others with ``collate_fn`` and adds the report.

    The batch is ``collate_fn(good_rows)`` (a dict) plus ``batch["bad_rows"]``: a :class:`BadRows`. When every row of
    the batch is bad, ``collate_fn`` is not called and the batch holds only the report. Picklable when ``collate_fn``
    is, so it runs in DataLoader workers.
    """

    def __init__(self, collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        good, bad = split_bad_rows(rows)
        batch = dict(self.collate_fn(good)) if good else {}
        if BAD_ROWS_KEY in batch:
            raise ValueError(f"The wrapped collator already produced a {BAD_ROWS_KEY!r} entry.")
        batch[BAD_ROWS_KEY] = BadRows(num_rows=len(rows), descriptions=tuple(bad))
        return batch


class BadRowCounter:
    """Counts rows seen and rows skipped over a run, keeps a few examples, and stops a run with too many bad rows.

    :meth:`update` raises a ``RuntimeError`` when

    * more than ``max_bad_row_fraction`` of the rows were bad, measured over at least ``min_rows`` rows: the test is
      ``num_bad > max_bad_row_fraction * max(num_rows, min_rows)``, so a few bad rows early on are tolerated, while a
      source that is mostly broken fails after about ``max_bad_row_fraction * min_rows`` bad rows; or
    * every row of the first two (or more) batches was bad, whatever the threshold.

    Args:
        max_bad_row_fraction: the largest tolerated fraction of bad rows, in [0, 1].
        min_rows: the number of rows over which the fraction is measured at the start of a run.
        max_examples: how many bad-row descriptions to keep for the error message and :meth:`summary`.
    """

    def __init__(self, max_bad_row_fraction: float = 0.01, min_rows: int = 1000, max_examples: int = 5) -> None:
        if not 0.0 <= max_bad_row_fraction <= 1.0:
            raise ValueError(f"max_bad_row_fraction must be in [0, 1], got {max_bad_row_fraction}.")
        if min_rows < 1:
            raise ValueError(f"min_rows must be at least 1, got {min_rows}.")
        if max_examples < 0:
            raise ValueError(f"max_examples must be non-negative, got {max_examples}.")
        self.max_bad_row_fraction = max_bad_row_fraction
        self.min_rows = min_rows
        self.max_examples = max_examples
        self.num_rows = 0
        self.num_bad = 0
        self.num_batches = 0
        self.examples: list[str] = []

    @property
    def bad_fraction(self) -> float:
        """The fraction of the rows seen so far that were bad (0 before any row)."""
        return self.num_bad / self.num_rows if self.num_rows else 0.0

    def update(self, num_rows: int, num_bad: int, examples: Sequence[str] = ()) -> None:
        """Record one batch: ``num_rows`` rows before skipping, ``num_bad`` of them bad, with their descriptions.

        Raises:
            ValueError: the counts are inconsistent.
            RuntimeError: too many bad rows (see the class docstring); the message gives the counts and examples.
        """
        if not 0 <= num_bad <= num_rows:
            raise ValueError(f"Expected 0 <= num_bad <= num_rows, got num_bad={num_bad}, num_rows={num_rows}.")
        self.num_rows += num_rows
        self.num_bad += num_bad
        self.num_batches += 1
        self.examples.extend(examples[: self.max_examples - len(self.examples)])
        examples_text = "; ".join(self.examples) or "none kept"
        if self.num_batches >= 2 and self.num_rows > 0 and self.num_bad == self.num_rows:
            raise RuntimeError(
                f"Every one of the first {self.num_rows} rows ({self.num_batches} batches) could not be decoded: "
                f"check the image column and paths of the source. Examples: {examples_text}"
            )
        if self.num_bad > self.max_bad_row_fraction * max(self.num_rows, self.min_rows):
            raise RuntimeError(
                f"{self.num_bad} of {self.num_rows} rows ({self.bad_fraction:.2%}) could not be decoded, more than "
                f"--max_bad_row_fraction={self.max_bad_row_fraction}; examples: {examples_text}"
            )

    def summary(self) -> str:
        """One line for the logs: how many rows were skipped, with the kept examples."""
        text = (
            f"{self.num_bad} of {self.num_rows} rows ({self.bad_fraction:.2%}) could not be decoded and were skipped"
        )
        return f"{text}; examples: {'; '.join(self.examples)}" if self.examples else text


__all__ = [
    "BAD_ROWS_KEY",
    "BAD_ROW_MARKER",
    "IMAGE_COLUMN",
    "TABLE_SUFFIXES",
    "TEXT_COLUMN",
    "BadRowCounter",
    "BadRows",
    "ImageTextDecoder",
    "SkipBadRows",
    "load_image_text_dataset",
    "split_bad_rows",
    "with_lazy_decoding",
]
