"""Tests of the embedded synthetic image-text dataset (xmodal.training.data)."""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import replace

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict
from datasets import Image as ImageFeature
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from xmodal.training.data import (
    ANSWER_VOCAB,
    COLORS,
    FEATURES,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    ask_questions,
    caption_corpus,
    describe_scene,
    make_synthetic_dataset,
    render_scene,
    sample_scene,
)

_POSITION_PHRASES = {
    "at the top left": "top left",
    "at the top": "top",
    "at the top right": "top right",
    "on the left": "left",
    "in the center": "center",
    "on the right": "right",
    "at the bottom left": "bottom left",
    "at the bottom": "bottom",
    "at the bottom right": "bottom right",
}


@pytest.fixture(scope="module")
def dataset() -> DatasetDict:
    return make_synthetic_dataset(num_train=200, num_validation=40, num_test=60, seed=0)


def _raw(split: Dataset) -> Dataset:
    """The split with undecoded images, so that their PNG bytes can be compared."""
    return split.cast_column("image", ImageFeature(decode=False))


def _words(text: str, vocabulary: object) -> set[str]:
    return {word for word in vocabulary if re.search(rf"\b{word}\b", text)}


def _holds(first: SceneObject, relation: str, second: SceneObject) -> bool:
    return {
        "to the left of": first.col < second.col,
        "to the right of": first.col > second.col,
        "above": first.row < second.row,
        "below": first.row > second.row,
    }[relation]


def _expected_answer(scene: Scene, question: str) -> str:
    """Answer ``question`` from the scene alone, independently of the generator's code."""
    by_shape = {obj.shape: obj for obj in scene.objects}
    if match := re.fullmatch(r"what color is the (\w+)\?", question):
        return by_shape[match[1]].color
    if question in ("how many shapes are there?", "how many objects are in the image?"):
        return str(len(scene.objects))
    if match := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(obj.color == match[1] for obj in scene.objects))
    if match := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((obj.color, obj.shape) == (match[1], match[2]) for obj in scene.objects) else "no"
    if match := re.fullmatch(r"what shape is (.+)\?", question):
        return next(obj.shape for obj in scene.objects if obj.position == _POSITION_PHRASES[match[1]])
    if match := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        assert by_shape[match[2]].color == match[1]
        return by_shape[match[2]].position
    if match := re.fullmatch(r"what size is the (\w+)\?|is the (\w+) small or large\?", question):
        return by_shape[match[1] or match[2]].size
    if match := re.fullmatch(
        r"is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", question
    ):
        first, second = by_shape[match[2]], by_shape[match[5]]
        assert (first.color, second.color) == (match[1], match[4])
        return "yes" if _holds(first, match[3], second) else "no"
    raise AssertionError(f"unknown question type: {question!r}")


def _check_example(example: dict, image_size: int) -> None:
    """Check one decoded example against its own scene."""
    scene = Scene.from_json(example["scene"])
    colors = {obj.color for obj in scene.objects}
    shapes = {obj.shape for obj in scene.objects}
    assert example["num_objects"] == len(scene.objects)
    assert example["label"] == SHAPES.index(scene.objects[0].shape)
    assert example["text"] == example["captions"][0]
    assert 3 <= len(example["captions"]) <= 5 and len(set(example["captions"])) == len(example["captions"])
    for caption in example["captions"]:
        assert _words(caption, COLORS) == colors, caption
        assert _words(caption, SHAPES) == shapes, caption
    assert 3 <= len(example["questions"]) == len(example["answers"]) <= 5
    for question, answer in zip(example["questions"], example["answers"]):
        assert answer in ANSWER_VOCAB
        assert answer == _expected_answer(scene, question), question
    image = example["image"]
    assert image.mode == "RGB" and image.size == (image_size, image_size)
    assert np.array_equal(np.asarray(image), np.asarray(render_scene(scene, image_size)))


def test_features_and_split_sizes(dataset: DatasetDict) -> None:
    assert list(dataset) == ["train", "validation", "test"]
    assert [dataset[split].num_rows for split in dataset] == [200, 40, 60]
    for split in dataset.values():
        assert split.features == FEATURES
    label = dataset["train"].features["label"]
    assert isinstance(label, ClassLabel) and label.names == list(SHAPES)
    example = dataset["train"][0]
    assert isinstance(example["image"], Image.Image)
    assert isinstance(example["text"], str) and isinstance(example["scene"], str)
    assert all(isinstance(text, str) for key in ("captions", "questions", "answers") for text in example[key])
    assert isinstance(example["label"], int) and isinstance(example["num_objects"], int)


def test_examples_are_consistent_with_their_scene(dataset: DatasetDict) -> None:
    for split in dataset.values():
        for example in split:
            _check_example(example, 64)


def test_scene_statistics(dataset: DatasetDict) -> None:
    scenes = [Scene.from_json(text) for text in dataset["train"]["scene"]]
    assert {len(scene.objects) for scene in scenes} == {1, 2, 3}
    assert {obj.shape for scene in scenes for obj in scene.objects} == set(SHAPES)
    assert {obj.color for scene in scenes for obj in scene.objects} == set(COLORS)
    assert {obj.position for scene in scenes for obj in scene.objects} == set(POSITIONS)
    for scene in scenes:  # the labelled object is the largest
        if len(scene.objects) > 1:
            assert [obj.size for obj in scene.objects] == ["large"] + ["small"] * (len(scene.objects) - 1)
    relations = ("to the left of", "to the right of", "above", "below")
    captions = [caption for captions in dataset["train"]["captions"] for caption in captions]
    assert all(any(relation in caption for caption in captions) for relation in relations)


def test_answers_in_vocabulary(dataset: DatasetDict) -> None:
    answers = {answer for split in dataset.values() for answers in split["answers"] for answer in answers}
    assert answers <= set(ANSWER_VOCAB)
    assert {"yes", "no", "0", "1", "2", "3"} <= answers
    assert len(ANSWER_VOCAB) == len(set(ANSWER_VOCAB))


def test_deterministic(dataset: DatasetDict) -> None:
    again = make_synthetic_dataset(num_train=200, num_validation=40, num_test=60, seed=0)
    for split in dataset:
        assert _raw(again[split]).to_dict() == _raw(dataset[split]).to_dict()
    other = _raw(make_synthetic_dataset(num_train=200, num_validation=0, num_test=0, seed=1)["train"])
    train = _raw(dataset["train"])
    assert other["text"] != train["text"]
    assert all(a["bytes"] != b["bytes"] for a, b in zip(other["image"], train["image"]))


def test_splits_are_independent(dataset: DatasetDict) -> None:
    smaller = make_synthetic_dataset(num_train=30, num_validation=5, num_test=60, seed=0)
    assert _raw(smaller["test"]).to_dict() == _raw(dataset["test"]).to_dict()
    assert _raw(smaller["train"]).to_dict() == _raw(dataset["train"].select(range(30))).to_dict()
    assert _raw(smaller["validation"]).to_dict() == _raw(dataset["validation"].select(range(5))).to_dict()
    # Splits are different streams, not slices of one.
    assert set(dataset["train"]["scene"]).isdisjoint(dataset["test"]["scene"])


def test_empty_splits_and_larger_split() -> None:
    empty = make_synthetic_dataset(num_train=0, num_validation=0, num_test=0)
    assert all(split.num_rows == 0 and split.features == FEATURES for split in empty.values())
    big = make_synthetic_dataset(num_train=2000, num_validation=0, num_test=0, seed=7)["train"]
    assert big.num_rows == 2000
    assert len(set(big["scene"])) == 2000
    _check_example(big[1999], 64)


def test_images_show_the_objects(dataset: DatasetDict) -> None:
    for example in dataset["validation"]:
        pixels = np.asarray(example["image"]).reshape(-1, 3)
        for obj in Scene.from_json(example["scene"]).objects:
            assert (pixels == COLORS[obj.color]).all(axis=1).sum() >= 4, obj
        background = pixels[~np.isin(pixels, list(COLORS.values())).all(axis=1)]
        assert background.std(axis=0).max() > 1.0  # the background is noised, not flat


def test_render_respects_cells() -> None:
    """Each object is drawn inside its own grid cell, so objects never overlap."""
    for index in range(30):
        scene = sample_scene(random.Random(index))
        pixels = np.asarray(render_scene(scene, 96)).astype(int)
        for obj in scene.objects:
            if [other.color for other in scene.objects].count(obj.color) > 1:
                continue
            # Anti-aliased edge pixels lie between the object colour and the background.
            distance = np.abs(pixels - COLORS[obj.color]).sum(axis=2)
            rows, cols = np.nonzero(distance < 60)
            assert rows.min() >= obj.row * 32 and rows.max() < (obj.row + 1) * 32
            assert cols.min() >= obj.col * 32 and cols.max() < (obj.col + 1) * 32


def test_swapped_scenes_have_disjoint_captions() -> None:
    """Swapping two objects' colours or positions gives a scene none of whose captions fit the original."""
    checked = 0
    for index in range(300):
        scene = sample_scene(random.Random(index))
        if len(scene.objects) < 2 or len({obj.color for obj in scene.objects}) < len(scene.objects):
            continue
        a, b, *rest = scene.objects
        swapped_colors = replace(scene, objects=(replace(a, color=b.color), replace(b, color=a.color), *rest))
        swapped_positions = replace(
            scene, objects=(replace(a, position=b.position), replace(b, position=a.position), *rest)
        )
        for rng_seed in range(3):
            captions = set(describe_scene(scene, random.Random(rng_seed)))
            for other in (swapped_colors, swapped_positions):
                for other_seed in range(3):
                    assert captions.isdisjoint(describe_scene(other, random.Random(other_seed)))
        checked += 1
    assert checked > 50


def test_yes_no_answers_are_balanced() -> None:
    answers = [
        answer
        for index in range(400)
        for answer in ask_questions(sample_scene(random.Random(index)), random.Random(-index))[1]
        if answer in ("yes", "no")
    ]
    assert len(answers) > 200
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_caption_corpus(dataset: DatasetDict) -> None:
    train = list(caption_corpus(dataset["train"]))
    expected = sum(
        len(captions) + len(questions) + len(answers)
        for captions, questions, answers in zip(
            dataset["train"]["captions"], dataset["train"]["questions"], dataset["train"]["answers"]
        )
    )
    assert len(train) == expected
    assert train[: len(dataset["train"][0]["captions"])] == dataset["train"][0]["captions"]
    every = list(caption_corpus(dataset))
    assert every[: len(train)] == train and len(every) > len(train)
    assert set(ANSWER_VOCAB) - {"0"} <= set(every)


def test_scene_json_round_trip() -> None:
    scene = sample_scene(random.Random(3))
    assert Scene.from_json(scene.to_json()) == scene
    assert json.loads(scene.to_json())["objects"][0]["shape"] in SHAPES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": -1}, r"num_train must be an integer >= 0"),
        ({"num_validation": -5}, r"num_validation must be an integer >= 0"),
        ({"num_test": -1}, r"num_test must be an integer >= 0"),
        ({"seed": -1}, r"seed must be an integer >= 0"),
        ({"image_size": 15}, r"image_size must be an integer in \[16, 1024\], got 15"),
        ({"image_size": 2048}, r"image_size must be an integer in \[16, 1024\]"),
    ],
)
def test_argument_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(**{"num_train": 1, "num_validation": 1, "num_test": 1, **kwargs})


@pytest.mark.parametrize("kwargs", [{"num_train": 2.0}, {"image_size": "64"}, {"seed": True}])
def test_argument_types(kwargs: dict) -> None:
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        make_synthetic_dataset(**{"num_train": 1, "num_validation": 1, "num_test": 1, **kwargs})


def test_invalid_scenes() -> None:
    circle = SceneObject(shape="circle", color="red", size="large", position="center")
    with pytest.raises(ValueError, match="distinct positions"):
        Scene(objects=(circle, replace(circle, shape="star")))
    with pytest.raises(ValueError, match="distinct shapes"):
        Scene(objects=(circle, replace(circle, position="top")))
    with pytest.raises(ValueError, match="1 to 3 objects"):
        Scene(objects=())
    with pytest.raises(ValueError, match="color must be one of"):
        replace(circle, color="grey")
    with pytest.raises(ValueError, match="offset"):
        replace(circle, offset=(0.0, 1.5))
    with pytest.raises(ValueError, match="image_size"):
        render_scene(Scene(objects=(circle,)), 8)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**63), image_size=st.integers(min_value=16, max_value=128))
def test_property_any_seed_and_size(seed: int, image_size: int) -> None:
    data = make_synthetic_dataset(num_train=2, num_validation=1, num_test=1, seed=seed, image_size=image_size)
    for split in data.values():
        for example in split:
            _check_example(example, image_size)
    png = _raw(data["train"])[0]["image"]["bytes"]
    assert Image.open(io.BytesIO(png)).format == "PNG"
