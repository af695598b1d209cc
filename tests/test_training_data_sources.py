"""Tests of the image-text dataset sources and of skipping undecodable rows (training/data/sources.py)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, List, Value
from datasets import Image as ImageFeature
from datasets.exceptions import DatasetNotFoundError
from PIL import Image
from torch.utils.data import DataLoader

from xmodal.training.data import (
    BAD_ROW_MARKER,
    BAD_ROWS_KEY,
    BadRowCounter,
    BadRows,
    ImageTextDecoder,
    SkipBadRows,
    load_image_text_dataset,
    split_bad_rows,
    with_lazy_decoding,
)
from xmodal.training.data import sources as sources_module

SYNTHETIC_SIZES = {"num_train": 6, "num_validation": 2, "num_test": 2, "image_size": 16}
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def _png_bytes(size: int = 16, seed: int = 0) -> bytes:
    """A noisy RGB PNG (noise makes the compressed stream long enough to corrupt or cut in the middle)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode(image: Image.Image, format: str = "PNG") -> dict[str, Any]:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return {"bytes": buffer.getvalue(), "path": None}


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in COLORS.items():
        Image.new("RGB", (8, 8), color).save(folder / f"{name}.png")


def _collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A minimal collator: images as a (B, 3, 8, 8) uint8 tensor, captions as a list."""
    pixels = torch.stack([torch.from_numpy(np.array(row["image"])).permute(2, 0, 1) for row in rows])
    return {"pixel_values": pixels, "text": [row["text"] for row in rows]}


@pytest.fixture
def cache_kwargs(tmp_path: Path) -> dict[str, str]:
    """Keeps the datasets cache of the tests' tables out of the user's cache."""
    return {"cache_dir": str(tmp_path / "hf-cache")}


@pytest.fixture
def table_dir(tmp_path: Path) -> Path:
    """`data/` holding `images/<color>.png`, `captions.csv` (one caption per image) and `captions.jsonl` (two)."""
    root = tmp_path / "data"
    _write_images(root / "images")
    with (root / "captions.csv").open("w") as file:
        file.write("file,caption,index\n")
        for index, name in enumerate(COLORS):
            file.write(f"images/{name}.png,a {name} square,{index}\n")
    with (root / "captions.jsonl").open("w") as file:
        for name in COLORS:
            record = {"file": f"images/{name}.png", "captions": [f"a {name} square", f"all {name}"]}
            file.write(json.dumps(record) + "\n")
    return root


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """A datasets imagefolder laid out like ../shared/data/emoji-google: PNGs plus metadata.jsonl."""
    root = tmp_path / "imagefolder"
    _write_images(root)
    with (root / "metadata.jsonl").open("w") as file:
        for name in COLORS:
            record = {"file_name": f"{name}.png", "text": "a square", "name": f"{name} square", "category": name}
            file.write(json.dumps(record) + "\n")
    return root


@pytest.fixture
def broken_table(tmp_path: Path) -> Path:
    """A CSV of 8 rows: 4 good PNGs, a corrupt PNG, a truncated PNG, a zero-byte file and a missing file."""
    root = tmp_path / "broken"
    root.mkdir()
    good = [f"good{index}.png" for index in range(4)]
    for index, name in enumerate(good):
        (root / name).write_bytes(_png_bytes(8, seed=index))
    data = bytearray(_png_bytes(32, seed=9))
    data[60:200] = bytes(140)  # inside the compressed pixel data: the chunk's CRC no longer matches
    (root / "corrupt.png").write_bytes(bytes(data))
    (root / "truncated.png").write_bytes(_png_bytes(32, seed=10)[:400])
    (root / "empty.png").write_bytes(b"")
    files = [good[0], "corrupt.png", good[1], "truncated.png", good[2], "empty.png", good[3], "missing.png"]
    (root / "table.csv").write_text("path,caption\n" + "".join(f"{name},caption of {name}\n" for name in files))
    return root


# --- sources -----------------------------------------------------------------------------------------------------


def test_synthetic_source_gives_undecoded_images_and_keeps_other_columns():
    splits = load_image_text_dataset("synthetic", builder_kwargs=SYNTHETIC_SIZES)
    assert isinstance(splits, DatasetDict)
    assert {name: len(split) for name, split in splits.items()} == {"train": 6, "validation": 2, "test": 2}
    train = load_image_text_dataset("synthetic", split="train", builder_kwargs=SYNTHETIC_SIZES)
    assert isinstance(train, Dataset)
    assert train.features["image"] == ImageFeature(decode=False)
    assert {"captions", "questions", "answers", "label"} <= set(train.column_names)
    row = train[0]
    assert set(row["image"]) == {"bytes", "path"} and row["image"]["bytes"].startswith(b"\x89PNG")
    assert row["text"] == row["captions"][0]

    decoded = with_lazy_decoding(train)[0]
    assert decoded[BAD_ROW_MARKER] is None
    assert decoded["image"].mode == "RGB" and decoded["image"].size == (16, 16)
    assert decoded["text"] == row["text"]


def test_synthetic_captions_column_gives_one_of_several_captions():
    train = load_image_text_dataset("synthetic", split="train", text_column="captions", builder_kwargs=SYNTHETIC_SIZES)
    assert "captions" not in train.column_names  # renamed to "text"; the single-caption "text" was replaced
    assert isinstance(train.features["text"], List)
    captions = train[0]["text"]
    assert len(captions) >= 3
    assert with_lazy_decoding(train)[0]["text"] in captions


def test_imagefolder_source_with_a_chosen_caption_column(imagefolder, cache_kwargs):
    dataset = load_image_text_dataset(str(imagefolder), split="train", text_column="name", builder_kwargs=cache_kwargs)
    assert len(dataset) == len(COLORS)
    assert dataset.features["image"] == ImageFeature(decode=False)
    assert "name" not in dataset.column_names and "category" in dataset.column_names
    by_category = {row["category"]: row for row in with_lazy_decoding(dataset)}
    for name, color in COLORS.items():
        assert by_category[name]["text"] == f"{name} square"  # from "name", not the metadata's own "text"
        assert by_category[name]["image"].getpixel((0, 0)) == color


def test_csv_source_resolves_image_paths_against_its_folder(table_dir, cache_kwargs, monkeypatch):
    monkeypatch.chdir(table_dir.parent)  # paths must not depend on the working directory
    dataset = load_image_text_dataset(
        str(table_dir / "captions.csv"), split="train", image_column="file", text_column="caption",
        builder_kwargs=cache_kwargs,
    )  # fmt: skip
    assert dataset.column_names == ["image", "text", "index"]
    assert [Path(row["image"]["path"]) for row in dataset] == [table_dir / "images" / f"{n}.png" for n in COLORS]
    decoded = with_lazy_decoding(dataset)
    assert [decoded[i]["image"].getpixel((3, 3)) for i in range(len(COLORS))] == list(COLORS.values())
    assert decoded[1]["text"] == "a green square"
    (table_dir / "captions.tsv").write_text("file\tcaption\nimages/blue.png\ta blue, square\n")
    tsv = load_image_text_dataset(
        str(table_dir / "captions.tsv"), image_column="file", text_column="caption", builder_kwargs=cache_kwargs
    )
    assert tsv["train"][0]["text"] == "a blue, square"


def test_csv_source_accepts_absolute_paths_inside_its_folder(tmp_path, cache_kwargs):
    _write_images(tmp_path / "images")
    (tmp_path / "table.csv").write_text(f"image,text\n{tmp_path / 'images' / 'red.png'},red\n")
    dataset = load_image_text_dataset(str(tmp_path / "table.csv"), split="train", builder_kwargs=cache_kwargs)
    assert with_lazy_decoding(dataset)[0]["image"].getpixel((0, 0)) == COLORS["red"]


def test_csv_builder_with_data_files_per_split(table_dir, cache_kwargs):
    data_files = {"train": str(table_dir / "captions.csv"), "validation": [str(table_dir / "captions.csv")]}
    splits = load_image_text_dataset(
        "csv", data_files=data_files, image_column="file", text_column="caption", builder_kwargs=cache_kwargs
    )
    assert isinstance(splits, DatasetDict) and set(splits) == {"train", "validation"}
    assert len(splits["validation"]) == len(COLORS)
    with pytest.raises(ValueError, match="needs data_files"):
        load_image_text_dataset("csv", image_column="file", text_column="caption")


@pytest.mark.parametrize("bad_path", ["../outside.png", "images/../../outside.png", "ABSOLUTE"])
def test_image_paths_escaping_the_table_folder_are_rejected(tmp_path, cache_kwargs, bad_path):
    root = tmp_path / "data"
    _write_images(root / "images")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    bad_path = str(tmp_path / "outside.png") if bad_path == "ABSOLUTE" else bad_path
    (root / "table.csv").write_text(f"image,text\nimages/red.png,fine\n{bad_path},escapes\n")
    with pytest.raises(
        ValueError, match=r"Row 1 \(counting from 0\) of .*table\.csv .*points outside the folder"
    ) as error:
        load_image_text_dataset(str(root / "table.csv"), builder_kwargs=cache_kwargs)
    assert bad_path in str(error.value)


def test_jsonl_source_draws_each_of_several_captions(table_dir, cache_kwargs):
    dataset = load_image_text_dataset(
        str(table_dir / "captions.jsonl"), split="train", image_column="file", text_column="captions",
        builder_kwargs=cache_kwargs,
    )  # fmt: skip
    assert dataset[0]["text"] == ["a red square", "all red"]
    decoded = with_lazy_decoding(dataset)

    def draws() -> list[str]:
        torch.manual_seed(0)
        return [decoded[0]["text"] for _ in range(40)]

    first = draws()
    assert set(first) == {"a red square", "all red"}
    assert draws() == first  # the same torch seed draws the same captions


def test_streaming_with_a_shuffle_buffer_yields_every_row_once_per_epoch(table_dir, cache_kwargs):
    stream = load_image_text_dataset(
        str(table_dir / "captions.csv"), split="train", image_column="file", text_column="caption",
        streaming=True, shuffle_buffer_size=2, shuffle_seed=3, num_shards=4, builder_kwargs=cache_kwargs,
    )  # fmt: skip
    assert isinstance(stream, IterableDataset) and stream.num_shards == 4
    orders = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        orders.append([row["index"] for row in stream])
        assert sorted(orders[-1]) == list(range(len(COLORS)))
    assert len({tuple(order) for order in orders}) > 1  # reshuffled between epochs
    splits = load_image_text_dataset("synthetic", streaming=True, builder_kwargs=SYNTHETIC_SIZES)
    assert isinstance(splits, IterableDatasetDict)
    assert sum(1 for _ in splits["train"]) == SYNTHETIC_SIZES["num_train"]


def test_streaming_options_need_streaming():
    with pytest.raises(ValueError, match="shuffle_buffer_size applies to streaming=True"):
        load_image_text_dataset(shuffle_buffer_size=8, builder_kwargs=SYNTHETIC_SIZES)


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["no/such/dataset/dir", "./missing-folder", "missing.csv", "", "has spaces"])
def test_unknown_sources_name_what_is_accepted(source):
    with pytest.raises(ValueError, match=r"Unknown source .*Accepted sources: 'synthetic'"):
        load_image_text_dataset(source)


def test_unsupported_file_type_is_rejected(tmp_path):
    (tmp_path / "captions.txt").write_text("red.png red\n")
    with pytest.raises(ValueError, match=r"unsupported file type \(accepted: .csv, .tsv, .json, .jsonl\)"):
        load_image_text_dataset(str(tmp_path / "captions.txt"))


def test_dataset_missing_on_the_hub_names_what_is_accepted(monkeypatch):
    def not_found(*args: Any, **kwargs: Any) -> None:
        raise DatasetNotFoundError("Dataset 'someone/typo' doesn't exist on the Hub.")

    monkeypatch.setattr(sources_module, "load_dataset", not_found)  # no network in tests
    with pytest.raises(ValueError, match=r"Unknown source 'someone/typo': .*doesn't exist.*Accepted sources"):
        load_image_text_dataset("someone/typo")


def test_missing_columns_list_the_available_ones(table_dir, imagefolder, cache_kwargs):
    with pytest.raises(ValueError, match=r"no column 'caption' \(text_column='caption'\); available columns: "):
        load_image_text_dataset(str(imagefolder), text_column="caption", builder_kwargs=cache_kwargs)
    with pytest.raises(ValueError, match=r"available columns: \['file', 'caption', 'index'\]"):
        load_image_text_dataset(str(table_dir / "captions.csv"), image_column="path", builder_kwargs=cache_kwargs)
    with pytest.raises(TypeError, match="must hold a caption"):
        load_image_text_dataset(text_column="label", builder_kwargs=SYNTHETIC_SIZES)
    with pytest.raises(ValueError, match="must differ"):
        load_image_text_dataset(image_column="text", builder_kwargs=SYNTHETIC_SIZES)


def test_empty_datasets_are_rejected(tmp_path, cache_kwargs):
    (tmp_path / "empty.csv").write_text("image,text\n")
    with pytest.raises(ValueError, match="has no rows"):
        load_image_text_dataset(str(tmp_path / "empty.csv"), builder_kwargs=cache_kwargs)
    with pytest.raises(ValueError, match=r"Source 'synthetic', split 'train' has no rows"):
        load_image_text_dataset(split="train", builder_kwargs={**SYNTHETIC_SIZES, "num_train": 0})


# --- decoding and bad rows ---------------------------------------------------------------------------------------


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 1  # palette index 1 (blue) is transparent
    return image


@pytest.mark.parametrize(
    "image, format, expected",
    [
        (_palette_with_transparency(), "PNG", {(0, 0): (255, 0, 0), (1, 1): (255, 255, 255)}),
        (Image.new("LA", (4, 4), (0, 0)), "PNG", {(0, 0): (255, 255, 255)}),  # fully transparent: white
        (Image.new("LA", (4, 4), (0, 255)), "PNG", {(0, 0): (0, 0, 0)}),
        (Image.new("RGBA", (4, 4), (0, 0, 255, 255)), "PNG", {(0, 0): (0, 0, 255)}),
        (Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), "PNG", {(0, 0): (255, 255, 255)}),
        (Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)), "PNG", {(0, 0): (128, 128, 128)}),  # not clipped
        (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF", {(0, 0): (255, 0, 0)}),
        (Image.new("1", (4, 4), 1), "PNG", {(0, 0): (255, 255, 255)}),
    ],
    ids=["palette-transparency", "LA-transparent", "LA-opaque", "RGBA", "I;16-max", "I;16-mid", "CMYK", "1"],
)
def test_decoder_converts_every_mode_to_rgb(image, format, expected):
    row = ImageTextDecoder().decode_row({"image": _encode(image, format), "text": "caption", "extra": 1})
    assert row[BAD_ROW_MARKER] is None and row["extra"] == 1 and row["text"] == "caption"
    assert row["image"].mode == "RGB"
    assert {xy: row["image"].getpixel(xy) for xy in expected} == expected


def test_decoder_marks_bad_rows_instead_of_raising():
    decoder = ImageTextDecoder()
    batch = {
        "image": [{"bytes": _png_bytes(), "path": None}, {"bytes": b"not an image", "path": None}, None],
        "text": ["fine", "fine", "fine"],
    }
    out = decoder(batch)
    assert out["image"][0].mode == "RGB" and out[BAD_ROW_MARKER][0] is None
    assert out["image"][1] is None and out[BAD_ROW_MARKER][1].startswith("<12 bytes of image data>: ")
    assert out[BAD_ROW_MARKER][2].startswith("<no image>: ")
    no_caption = decoder.decode_row({"image": {"bytes": _png_bytes(), "path": None}, "text": []})
    assert "no caption" in no_caption[BAD_ROW_MARKER]
    with pytest.raises(ValueError, match=r"needs the columns 'image' and 'text'.*available columns: \['img'"):
        decoder.decode_row({"img": None, "caption": "x"})


@pytest.mark.parametrize(("streaming", "num_workers"), [(False, 0), (False, 2), (True, 2)])
def test_bad_rows_are_skipped_and_counted_through_a_dataloader(broken_table, cache_kwargs, streaming, num_workers):
    dataset = load_image_text_dataset(
        str(broken_table / "table.csv"), split="train", image_column="path", text_column="caption",
        streaming=streaming, num_shards=2, builder_kwargs=cache_kwargs,
    )  # fmt: skip
    loader = DataLoader(
        with_lazy_decoding(dataset), batch_size=3, num_workers=num_workers, collate_fn=SkipBadRows(_collate)
    )
    counter = BadRowCounter(max_bad_row_fraction=0.5, min_rows=8, max_examples=10)
    captions = []
    for batch in loader:
        report = batch.pop(BAD_ROWS_KEY)
        assert isinstance(report, BadRows)
        counter.update(report.num_rows, report.num_bad, report.descriptions)
        if batch:
            assert batch["pixel_values"].shape[1:] == (3, 8, 8)
            assert batch["pixel_values"].shape[0] == len(batch["text"]) == report.num_rows - report.num_bad
            captions += batch["text"]
    assert (counter.num_rows, counter.num_bad) == (8, 4)
    assert sorted(captions) == [f"caption of good{index}.png" for index in range(4)]
    bad = {Path(example.split(": ")[0]).name: example for example in counter.examples}
    assert set(bad) == {"corrupt.png", "truncated.png", "empty.png", "missing.png"}
    assert "FileNotFoundError" in bad["missing.png"] and "UnidentifiedImageError" in bad["empty.png"]
    assert "4 of 8 rows (50.00%) could not be decoded" in counter.summary()


def test_too_many_bad_rows_raise_with_examples(broken_table, cache_kwargs):
    dataset = load_image_text_dataset(
        str(broken_table / "table.csv"), split="train", image_column="path", text_column="caption",
        builder_kwargs=cache_kwargs,
    )  # fmt: skip
    loader = DataLoader(with_lazy_decoding(dataset), batch_size=4, collate_fn=SkipBadRows(_collate))
    counter = BadRowCounter(max_bad_row_fraction=0.25, min_rows=4, max_examples=2)
    with pytest.raises(RuntimeError) as error:
        for batch in loader:
            report = batch.pop(BAD_ROWS_KEY)
            counter.update(report.num_rows, report.num_bad, report.descriptions)
    message = str(error.value)
    assert message.startswith("2 of 4 rows (50.00%) could not be decoded, more than --max_bad_row_fraction=0.25")
    assert "corrupt.png: " in message and "truncated.png: " in message  # examples name the paths and errors


def test_bad_row_counter_tolerates_a_few_early_bad_rows():
    counter = BadRowCounter(max_bad_row_fraction=0.1, min_rows=20)
    counter.update(1, 1, ["first.png: OSError: broken"])  # one bad first row: 1 <= 0.1 * 20
    counter.update(9, 0)
    counter.update(10, 1)  # 2 of 20 = 10%: not more than the threshold
    assert (counter.num_rows, counter.num_bad, counter.examples) == (20, 2, ["first.png: OSError: broken"])
    with pytest.raises(RuntimeError, match=r"3 of 21 rows \(14\.29%\) .*examples: first\.png: OSError: broken"):
        counter.update(1, 1)
    with pytest.raises(ValueError, match="num_bad <= num_rows"):
        BadRowCounter().update(2, 3)
    with pytest.raises(ValueError, match=r"max_bad_row_fraction must be in \[0, 1\]"):
        BadRowCounter(max_bad_row_fraction=1.5)


def test_bad_row_counter_stops_when_every_row_of_the_first_batches_is_bad():
    counter = BadRowCounter(max_bad_row_fraction=1.0, min_rows=1000)  # the fraction alone would never raise
    counter.update(4, 4, ["a.png: OSError: x"])
    with pytest.raises(RuntimeError, match=r"Every one of the first 8 rows \(2 batches\) could not be decoded"):
        counter.update(4, 4)
    strict = BadRowCounter(max_bad_row_fraction=0.0)
    strict.update(100, 0)
    with pytest.raises(RuntimeError, match=r"1 of 101 rows"):
        strict.update(1, 1, ["b.png: OSError: y"])


def test_split_bad_rows_and_skip_bad_rows():
    rows = [
        {"image": "i0", "text": "t0", BAD_ROW_MARKER: None},
        {"image": None, "text": None, BAD_ROW_MARKER: "x.png: OSError: broken"},
    ]
    assert split_bad_rows(rows) == ([{"image": "i0", "text": "t0"}], ["x.png: OSError: broken"])
    all_bad = SkipBadRows(_collate)([rows[1], rows[1]])
    assert all_bad == {BAD_ROWS_KEY: BadRows(num_rows=2, descriptions=("x.png: OSError: broken",) * 2)}
    assert all_bad[BAD_ROWS_KEY].num_bad == 2
    with pytest.raises(ValueError, match="wrap the dataset with with_lazy_decoding"):
        split_bad_rows([{"image": "i0", "text": "t0"}])


# --- real data ---------------------------------------------------------------------------------------------------


def test_emoji_imagefolder_with_names_as_captions(shared_data):
    emoji = shared_data / "emoji-google"
    dataset = load_image_text_dataset(str(emoji), split="train", text_column="name")
    assert len(dataset) == 1906
    assert dataset.features["image"] == ImageFeature(decode=False)
    assert dataset.features["text"] == Value("string")
    names = {}
    with (emoji / "metadata.jsonl").open() as file:
        for line in file:
            record = json.loads(line)
            names[record["file_name"]] = record["name"]
    decoded = with_lazy_decoding(dataset)
    for index in (0, 1000, 1905):
        row = decoded[index]
        assert row[BAD_ROW_MARKER] is None
        assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
        assert row["text"] == names[Path(dataset[index]["image"]["path"]).name]
    assert Counter(row["category"] for row in dataset.select_columns(["category"])).most_common(1)[0][1] > 100
