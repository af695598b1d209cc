"""WebDataset tar shards as a source (training/data/webdataset.py): shard patterns, key selection, each process and
each DataLoader worker reading shards of its own, held-out shards, and a pretraining run on a few shards."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from xmodal.training import PretrainArguments, pretrain
from xmodal.training.data import (
    BAD_ROW_MARKER,
    expand_braces,
    load_image_text_dataset,
    shard_across_processes,
    webdataset_shards,
    with_lazy_decoding,
)
from xmodal.training.data.pipeline import DataArguments, load_pretraining_data

pytestmark = pytest.mark.usefixtures("single_thread")

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
NUM_SHARDS, ROWS_PER_SHARD = 4, 6
TINY = json.dumps(
    {
        "vision_config": {"num_hidden_layers": 1, "image_size": 32},
        "text_config": {"num_hidden_layers": 1},
        "cross_config": {"num_hidden_layers": 1},
    }
)


def _write_shard(path: Path, first: int, num_rows: int) -> None:
    """A WebDataset shard: per sample `<key>.png` (a solid square), `<key>.txt` and `<key>.json` (its caption)."""
    names = list(COLORS)
    with tarfile.open(path, "w") as tar:
        for index in range(first, first + num_rows):
            name = names[index % len(names)]
            image = io.BytesIO()
            Image.new("RGB", (12, 12), COLORS[name]).save(image, format="PNG")
            members = {
                "png": image.getvalue(),
                "txt": f"a {name} square".encode(),
                "json": json.dumps({"caption": f"the colour {name}", "index": index}).encode(),
            }
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{index:06d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """`shards/00000.tar` ... `shards/00003.tar`, 6 samples each (keys 000000 to 000023, in order)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(NUM_SHARDS):
        _write_shard(folder / f"{shard:05d}.tar", shard * ROWS_PER_SHARD, ROWS_PER_SHARD)
    return folder


def _urls(dataset) -> list[str]:
    return [os.path.basename(row["__url__"]) for row in dataset]


def test_expand_braces_like_braceexpand():
    assert expand_braces("s/{000..003}.tar") == [f"s/{index:03d}.tar" for index in range(4)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"] and expand_braces("{2..0}") == ["2", "1", "0"]
    assert expand_braces("{a,b{0..1}}-{x,y}") == ["a-x", "a-y", "b0-x", "b0-y", "b1-x", "b1-y"]
    assert expand_braces("{x}.tar") == ["{x}.tar"] and expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="has a '{' without its '}'"):
        expand_braces("s/{0..3.tar")


def test_shards_rows_and_lazy_decoding(shards):
    dataset = load_image_text_dataset(str(shards / "{00000..00003}.tar"), split="train", streaming=True)
    assert dataset.n_shards == NUM_SHARDS
    assert {"image", "text", "json", "__key__", "__url__"} <= set(dataset.column_names)
    rows = list(with_lazy_decoding(dataset))
    assert [row["__key__"] for row in rows] == [f"{index:06d}" for index in range(NUM_SHARDS * ROWS_PER_SHARD)]
    first = rows[0]
    assert first[BAD_ROW_MARKER] is None and first["text"] == "a red square"
    assert first["image"].mode == "RGB" and first["image"].getpixel((0, 0)) == COLORS["red"]
    # a JSON member's field as the caption, an explicit image key
    from_json = load_image_text_dataset(str(shards / "00001.tar"), split="train", image_column="png",
                                        text_column="json.caption", streaming=True)  # fmt: skip
    assert next(iter(from_json))["text"] == "the colour blue"  # sample 6


def test_brace_glob_directory_and_joined_patterns_name_the_same_shards(shards, tmp_path):
    expected = [str(shards / f"{shard:05d}.tar") for shard in range(NUM_SHARDS)]
    assert webdataset_shards(str(shards / "{00000..00003}.tar")) == {"train": expected}
    assert webdataset_shards(str(shards / "*.tar")) == {"train": expected}
    assert webdataset_shards(str(shards / "{00000..00001}.tar") + "::" + str(shards / "0000[23].tar")) == {
        "train": expected
    }
    assert webdataset_shards(str(shards)) == {"train": expected}
    # a directory whose shard names mark splits, as datasets reads them
    split = tmp_path / "split"
    split.mkdir()
    for name in ("train-00000.tar", "train-00001.tar", "validation-00000.tar", "test-00000.tar"):
        _write_shard(split / name, 0, 2)
    found = webdataset_shards(str(split))
    assert {name: [os.path.basename(file) for file in files] for name, files in found.items()} == {
        "train": ["train-00000.tar", "train-00001.tar"],
        "validation": ["validation-00000.tar"],
        "test": ["test-00000.tar"],
    }
    assert set(load_image_text_dataset(str(split), streaming=True)) == {"train", "validation", "test"}
    with pytest.raises(ValueError, match=r"2 of the shards it names do not exist.*Accepted: a \.tar file"):
        webdataset_shards(str(shards / "{00003..00005}.tar"))


def test_processes_and_workers_read_disjoint_shards_covering_all(shards, caplog):
    dataset = load_image_text_dataset(str(shards), split="train", streaming=True)
    all_keys = {row["__key__"] for row in dataset}
    for world_size in (2, 3):
        with caplog.at_level(logging.WARNING, logger="xmodal.training.data.webdataset"):
            parts = [_urls(shard_across_processes(dataset, rank, world_size)) for rank in range(world_size)]
        per_rank = [set(urls) for urls in parts]
        assert sum(len(urls) for urls in per_rank) == NUM_SHARDS  # disjoint
        assert set().union(*per_rank) == {f"{shard:05d}.tar" for shard in range(NUM_SHARDS)}
        assert ("do not divide among 3 processes" in caplog.text) == (world_size == 3)
    # shuffled: each epoch deals the shards anew, still disjoint on every process
    shuffled = dataset.shuffle(seed=0, buffer_size=4)
    for epoch in (0, 1):
        keys = []
        for rank in range(2):
            part = shard_across_processes(shuffled, rank, 2)
            part.set_epoch(epoch)
            keys += [row["__key__"] for row in part]
        assert sorted(keys) == sorted(all_keys)
    with pytest.raises(ValueError, match="4 shard\\(s\\) for 5 processes: each process reads shards of its own"):
        shard_across_processes(dataset, 0, 5)
    # DataLoader workers of one process divide its shards: every row once
    part = shard_across_processes(dataset, 1, 2)
    loader = DataLoader(part.select_columns(["__key__", "__url__"]), batch_size=None, num_workers=2)
    rows = list(loader)
    assert sorted(row["__key__"] for row in rows) == sorted(row["__key__"] for row in part)
    assert {os.path.basename(row["__url__"]) for row in rows} == {"00001.tar", "00003.tar"}


def test_missing_keys_name_the_keys_found_and_the_accepted_ones(shards):
    with pytest.raises(ValueError) as error:
        load_image_text_dataset(str(shards / "00000.tar"), split="train", image_column="jpg", streaming=True)
    message = str(error.value)
    assert "no image key 'jpg' (image_column='jpg')" in message and "keys ['png', 'txt', 'json']" in message
    assert "--image_column" in message and "jpg, jpeg, png, webp" in message
    with pytest.raises(ValueError, match=r"no caption key 'caption'.*JSON fields \['json.caption', 'json.index'\]"):
        load_image_text_dataset(str(shards / "00000.tar"), split="train", text_column="caption", streaming=True)


def test_held_out_shards_and_the_rules_around_them(shards):
    args = DataArguments(dataset=str(shards / "{00000..00003}.tar"), num_eval_examples=4, num_validation_examples=8)
    data = load_pretraining_data(args, image_size=32, validation=True, process_index=1, num_processes=2)
    # test: the first 4 rows of the last shard; validation: the shard before; training: one of the first two each
    assert data.per_process and data.evaluation["__key__"] == [f"{index:06d}" for index in range(18, 22)]
    assert data.validation["__key__"] == [f"{index:06d}" for index in range(12, 18)]
    trained = {os.path.basename(row["__url__"]) for row in data.train}
    assert len(trained) == 1 and trained < {"00000.tar", "00001.tar"}
    assert len(set(data.corpus)) == len(COLORS)  # the captions of both training shards train the tokenizer
    with pytest.raises(ValueError, match="too few to hold one out for the 'test' split"):
        load_pretraining_data(DataArguments(dataset=str(shards / "00000.tar")), image_size=32)
    with pytest.raises(ValueError, match="--split_column does not apply to WebDataset shards"):
        load_pretraining_data(DataArguments(dataset=str(shards), split_column="split"), image_size=32)


def test_pretraining_on_shards_trains_and_saves_a_checkpoint(shards, tmp_path):
    args = PretrainArguments(
        dataset=str(shards / "{00000..00003}.tar"),
        output_dir=str(tmp_path / "run"),
        config_overrides=TINY,
        vocab_size=64,
        batch_size=4,
        max_steps=6,  # more than an epoch of the 18 training rows (4 batches)
        warmup_steps=1,
        num_eval_examples=6,
        eval_batch_size=6,
        save_steps=6,
    )
    metrics = pretrain(args)
    assert metrics["train_steps"] == 6 and metrics["bad_rows"] == 0 and metrics["rows_seen"] == 24
    assert metrics["test_chance_R@1"] == pytest.approx(1 / 6)  # the held-out last shard
    assert os.path.isfile(os.path.join(args.output_dir, "checkpoints", "step-000006", "model.safetensors"))
    assert os.path.isfile(os.path.join(args.output_dir, "model.safetensors"))
    card = open(os.path.join(args.output_dir, "README.md")).read()
    assert "shards/{00000..00003}.tar" in card and str(tmp_path) not in card
