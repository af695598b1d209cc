"""The data options shared by `xmodal pretrain` and `xmodal evaluate`, and loading a run's training and evaluation
splits from any source of :func:`~xmodal.training.data.load_image_text_dataset`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, Value

from .sources import BAD_ROW_MARKER, ImageTextDecoder, load_image_text_dataset, with_lazy_decoding
from .synthetic import caption_corpus
from .webdataset import hold_out_shards, is_webdataset_source, shard_across_processes, webdataset_shards

STREAMED_CORPUS_ROWS = 100_000
"""The captions of at most this many training rows (the first ones) train the tokenizer of a WebDataset source."""


@dataclass
class DataArguments:
    """Where the image-text pairs come from and which rows train and evaluate."""

    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "Image-text data: 'synthetic' (the embedded procedural scenes), a local imagefolder with "
            "metadata.jsonl, a CSV/JSON-lines file of image paths and captions, WebDataset .tar shards (a file, a "
            "glob or brace pattern such as 'shards/{00000..00009}.tar', or a directory; streamed, each process "
            "reading shards of its own), or a datasets name."
        },
    )
    image_column: str = field(
        default="image",
        metadata={
            "help": "Column of the images (or image paths); for WebDataset shards a sample key (default: the first "
            "of jpg, jpeg, png, webp)."
        },
    )
    text_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of the captions (a caption or a list: one is drawn per step). Default: 'captions' on the "
            "synthetic data (each scene's 3-5 captions), else 'text'; for WebDataset shards a sample key or a JSON "
            "field such as 'json.caption' (default: the first of txt, text, json.caption, json.text)."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split (or --split_column value) to train on."})
    eval_split: str = field(
        default="test",
        metadata={"help": "Split to evaluate on; without it, --num_eval_examples rows are held out of training."},
    )
    validation_split: str = field(
        default="validation",
        metadata={
            "help": "Split for the evaluations during training (--eval_steps) and model selection "
            "(--metric_for_best_model); without it, --num_validation_examples rows are held out of training."
        },
    )
    num_validation_examples: int = field(
        default=1000, metadata={"help": "Rows of the validation split evaluated during training (the first ones)."}
    )
    split_column: str | None = field(
        default=None,
        metadata={"help": "Column naming each row's split (e.g. emoji_split), for data with one split only."},
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the training data (IterableDataset)."})
    shuffle_buffer_size: int = field(default=10000, metadata={"help": "Shuffling buffer of streamed data."})
    max_bad_row_fraction: float = field(
        default=0.01, metadata={"help": "Share of undecodable rows (skipped and counted) that stops the run."}
    )
    num_train_examples: int = field(default=8000, metadata={"help": "Procedural training scenes (synthetic)."})
    num_eval_examples: int = field(
        default=1000, metadata={"help": "Evaluation rows (procedural: validation and test scenes each)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data, the initialisation and the data order."})
    zero_shot_label_column: str | None = field(
        default=None,
        metadata={"help": "Column of class labels for zero-shot evaluation (default: 'label' on the synthetic data)."},
    )
    zero_shot_templates: str = field(
        default="a {}.|there is a {}.",
        metadata={"help": "Zero-shot prompt templates, '|'-separated, each with {} for the class name."},
    )

    def __post_init__(self) -> None:
        if self.text_column is None:
            self.text_column = "captions" if self.dataset == "synthetic" else "text"
        for name in ("num_train_examples", "num_eval_examples", "num_validation_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if not 0 <= self.max_bad_row_fraction <= 1:
            raise ValueError(f"--max_bad_row_fraction must be in [0, 1], got {self.max_bad_row_fraction}.")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be at least 1, got {self.shuffle_buffer_size}.")


@dataclass
class PretrainingData:
    """The run's data: `train` yields decoded rows (lazily, marking undecodable ones), `evaluation` (the final test)
    and `validation` (evaluations during training, None unless asked for) hold decodable rows only, `corpus` is the
    text the tokenizer is trained on."""

    train: Dataset | IterableDataset
    evaluation: Dataset
    validation: Dataset | None
    corpus: Iterable[str]
    columns: list[str]  # of the training rows, before decoding (a decoded stream no longer lists them)
    # `train` holds this process's shards only: its batches are the process's own, not slices of a global batch
    per_process: bool = False


def _flatten_captions(texts: Iterable[str | list[str]]) -> Iterator[str]:
    for text in texts:
        if isinstance(text, str):
            yield text
        elif text:
            yield from text


def _select_split(dataset: Any, name: str, args: DataArguments) -> Any:
    if args.split_column is not None:
        split = next(iter(dataset.values())) if isinstance(dataset, (DatasetDict, IterableDatasetDict)) else dataset
        if args.split_column not in split.column_names:
            raise ValueError(
                f"--split_column {args.split_column!r} is not a column of {args.dataset}; columns: {split.column_names}."
            )
        selected = split.filter(lambda value: value == name, input_columns=args.split_column)
        if len(selected) == 0:
            values = sorted({str(value) for value in split.with_format(None)[args.split_column]})
            raise ValueError(
                f"No row of {args.dataset} has {args.split_column} == {name!r}; its values: {values[:20]}."
            )
        return selected
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        return dataset[name] if name in dataset else None
    return dataset if name == args.train_split else None


def _decodable(dataset: Dataset, limit: int) -> Dataset:
    """The first `limit` rows of `dataset` whose image decodes, lazily decoded. Rows with several captions are
    evaluated on their first (the same one at every evaluation); all of them stay in `captions` as references."""
    decoder = ImageTextDecoder()
    dataset = dataset.select(range(min(limit, len(dataset))))
    if not isinstance(dataset.features["text"], Value):
        keep_all = "captions" not in dataset.column_names
        dataset = dataset.map(
            lambda text: {"text": text[0] if text else "", **({"captions": list(text)} if keep_all else {})},
            input_columns="text",
        )
    good = [index for index in range(len(dataset)) if decoder.decode_row(dataset[index])[BAD_ROW_MARKER] is None]
    if not good:
        raise ValueError(f"No image of the evaluation split could be decoded ({len(dataset)} rows tried).")
    return with_lazy_decoding(dataset.select(good), decoder)


def _first_rows(stream: IterableDataset, limit: int) -> Dataset:
    """The first `limit` rows of a stream, in memory."""
    return Dataset.from_list(list(stream.take(limit)), features=stream.features)


def _load_webdataset(args: DataArguments, validation: bool, process_index: int, num_processes: int) -> PretrainingData:
    """A WebDataset source: the training shards streamed (shuffled with `--shuffle_buffer_size`, each process reading
    its own shards) and the first rows of the evaluation and validation splits. A split the shard names do not give
    is held out of the training split as its last shard (the evaluation split's), and the one before (validation)."""
    if args.split_column is not None:
        raise ValueError(
            f"--split_column does not apply to WebDataset shards ({args.dataset}); give each split its own shards "
            "instead, named like train-00000.tar, validation-00000.tar and test-00000.tar in one directory."
        )
    held_out = [args.eval_split] + ([args.validation_split] if validation else [])
    shards = hold_out_shards(webdataset_shards(args.dataset), args.train_split, held_out, f"--dataset {args.dataset}")
    # datasets names the one split of a list of data files "train"
    common = {"split": "train", "image_column": args.image_column, "text_column": args.text_column, "streaming": True}

    def load(split: str, **options: Any) -> IterableDataset:
        return load_image_text_dataset("webdataset", data_files=shards[split], **common, **options)

    train = load(args.train_split)
    corpus = _flatten_captions(row["text"] for row in train.take(STREAMED_CORPUS_ROWS))  # read when used
    stream = load(args.train_split, shuffle_buffer_size=args.shuffle_buffer_size, shuffle_seed=args.seed)
    evaluation = _first_rows(load(args.eval_split), args.num_eval_examples)
    selection = _first_rows(load(args.validation_split), args.num_validation_examples) if validation else None
    return PretrainingData(
        train=with_lazy_decoding(shard_across_processes(stream, process_index, num_processes)),
        evaluation=_decodable(evaluation, args.num_eval_examples),
        validation=_decodable(selection, args.num_validation_examples) if selection is not None else None,
        corpus=corpus,
        columns=list(train.column_names),
        per_process=True,
    )


def load_pretraining_data(
    args: DataArguments,
    image_size: int,
    validation: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
) -> PretrainingData:
    """Loads `--dataset` (the procedural scenes by default) with lazily decoded images and a held-out evaluation split
    (`--eval_split`, else `--num_eval_examples` rows held out of the training split with `--seed`, the same rows
    whenever the same options are given). With `validation`, also the rows evaluated during training
    (`--validation_split`, else `--num_validation_examples` more rows held out of training).

    WebDataset shards are streamed whatever `--streaming` says, and split between the processes: process
    `process_index` of `num_processes` reads its own shards (`PretrainingData.per_process`); a split their names do
    not give is a whole shard held out of training (the last one for `--eval_split`, the one before for
    `--validation_split`), of which the first `--num_eval_examples` (`--num_validation_examples`) rows are used."""
    if is_webdataset_source(args.dataset):
        return _load_webdataset(args, validation, process_index, num_processes)
    synthetic = args.dataset == "synthetic"
    builder = (
        {
            "num_train": args.num_train_examples,
            "num_validation": args.num_eval_examples,
            "num_test": args.num_eval_examples,
            "seed": args.seed,
            "image_size": image_size,
        }
        if synthetic
        else None
    )
    common = {"image_column": args.image_column, "text_column": args.text_column, "builder_kwargs": builder}
    raw = load_image_text_dataset(args.dataset, **common)
    train, evaluation = _select_split(raw, args.train_split, args), _select_split(raw, args.eval_split, args)
    if train is None:
        raise ValueError(f"{args.dataset} has no split {args.train_split!r} (--train_split).")
    if evaluation is None:
        held_out = train.train_test_split(test_size=args.num_eval_examples, seed=args.seed)
        train, evaluation = held_out["train"], held_out["test"]
    selection = _select_split(raw, args.validation_split, args) if validation else None
    if validation and selection is None:
        held_out = train.train_test_split(test_size=args.num_validation_examples, seed=args.seed + 1)
        train, selection = held_out["train"], held_out["test"]
    if synthetic and "captions" in train.column_names:
        corpus: Iterable[str] = list(caption_corpus(train))
    else:
        text_columns = [name for name in ("text", "questions", "answers") if name in train.column_names]
        corpus = [text for name in text_columns for text in _flatten_captions(train.with_format(None)[name])]
    columns = list(train.column_names)
    if args.streaming:
        train = train.to_iterable_dataset(num_shards=min(64, len(train))).shuffle(
            seed=args.seed, buffer_size=args.shuffle_buffer_size
        )
    return PretrainingData(
        train=with_lazy_decoding(train),
        evaluation=_decodable(evaluation, args.num_eval_examples),
        validation=_decodable(selection, args.num_validation_examples) if selection is not None else None,
        corpus=corpus,
        columns=columns,
    )


__all__ = ["DataArguments", "PretrainingData", "load_pretraining_data"]
