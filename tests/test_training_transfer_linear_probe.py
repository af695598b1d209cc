"""Linear probes: logistic regression on synthetic features (separable, noisy, L-BFGS vs AdamW, the validation-picked
L2), feature extraction and its cache on a tiny model, the whole evaluation on images whose features we control, and
`xmodal evaluate --linear_probe`."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Image, Value
from test_training_inference import ColourModel, save_tiny_model, solid, tiny_processor

from xmodal import XModalModel, XModalProcessor
from xmodal.training.cli import main
from xmodal.training.data import COLORS, make_synthetic_dataset
from xmodal.training.inference.embeddings import embed_images, embed_texts
from xmodal.training.transfer.linear_probe import (
    DEFAULT_L2_GRID,
    FEATURES_CACHE_PREFIX,
    extract_features,
    fit_linear_probe,
    fit_logistic_regression,
    linear_probe_evaluation,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The probes' tensors are tiny: one thread avoids thread oversubscription (and 10x slowdowns) on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(num_rows: int, dim: int, num_classes: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random centres of norm ~3 (rows cycle through the classes)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)
    labels = torch.arange(num_rows) % num_classes
    return centres[labels] + noise * torch.randn(num_rows, dim, generator=generator), labels


def two_classes(num_rows: int, noise: float, seed: int, dim: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes at +-1 on the first axis, isotropic noise of scale `noise` on all `dim` axes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_rows) % 2
    features = noise * torch.randn(num_rows, dim, generator=generator)
    features[:, 0] += 2 * labels - 1
    return features, labels


# ----------------------------------------------------------------------------------------------------------------
# Probes on synthetic features
# ----------------------------------------------------------------------------------------------------------------


def test_probe_on_linearly_separable_features_is_exact():
    features, labels = blobs(300, 8, 3, noise=0.2, seed=0)
    probe = fit_linear_probe(features[:150], labels[:150], features[150:200], labels[150:200])
    assert probe.weight.shape == (3, 8) and probe.bias.shape == (3,)
    assert probe.val_accuracy == 1.0
    assert probe.accuracy(features[200:], labels[200:]) == 1.0
    assert probe.predict(features[200:]).tolist() == labels[200:].tolist()


def test_noisy_features_pick_a_stronger_l2_than_clean_ones():
    for seed in range(3):
        clean, clean_labels = two_classes(240, noise=0.05, seed=seed)
        noisy, noisy_labels = two_classes(240, noise=1.0, seed=seed)
        clean_probe = fit_linear_probe(clean[:40], clean_labels[:40], clean[40:], clean_labels[40:])
        noisy_probe = fit_linear_probe(noisy[:40], noisy_labels[:40], noisy[40:], noisy_labels[40:])
        assert clean_probe.val_accuracy == 1.0
        # 50 noise dimensions for 40 training rows: the weakly regularised fits overfit
        assert noisy_probe.l2 > 100 * clean_probe.l2, (seed, noisy_probe.l2_search)
        assert noisy_probe.val_accuracy > noisy_probe.l2_search[min(noisy_probe.l2_search)]


def test_validation_picks_the_best_strength_of_the_grid_then_refines_around_it():
    features, labels = two_classes(240, noise=1.0, seed=4)
    train, val = (features[:40], labels[:40]), (features[40:], labels[40:])
    grid = (1e-4, 1e-2, 1.0, 100.0)
    probe = fit_linear_probe(*train, *val, l2_grid=grid, refine_steps=0)
    assert list(probe.l2_search) == list(grid)
    assert len(set(probe.l2_search.values())) > 1  # the choice matters
    assert probe.l2 in grid and probe.l2_search[probe.l2] == max(probe.l2_search.values())
    assert probe.val_accuracy == pytest.approx(probe.accuracy(*val))

    refined = fit_linear_probe(*train, *val, l2_grid=grid, refine_steps=2)
    extra = sorted(set(refined.l2_search) - set(grid))
    assert len(extra) >= 2 and all(min(grid) < l2 < max(grid) for l2 in extra)
    assert refined.l2_search[refined.l2] == max(refined.l2_search.values()) >= probe.val_accuracy
    assert list(refined.l2_search) == sorted(refined.l2_search)


def test_lbfgs_and_adamw_fit_the_same_probe():
    features, labels = blobs(400, 16, 4, noise=1.0, seed=1)
    train, val, test = (features[:240], labels[:240]), (features[240:320], labels[240:320]), features[320:]
    lbfgs = fit_linear_probe(*train, *val, l2_grid=(1e-2,), refine_steps=0)
    full_batch = fit_linear_probe(*train, *val, l2_grid=(1e-2,), refine_steps=0, method="adamw", max_iter=300)
    minibatch = fit_logistic_regression(*train, 1e-2, method="adamw", max_iter=300, batch_size=32, seed=3)
    for adamw in (full_batch, minibatch):
        assert (adamw.predict(test) == lbfgs.predict(test)).float().mean() >= 0.95
        assert (adamw.weight - lbfgs.weight).norm() < 0.1 * lbfgs.weight.norm()
    assert abs(full_batch.val_accuracy - lbfgs.val_accuracy) <= 0.025


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((torch.zeros(4, 3), [0, 1, 0], torch.zeros(2, 3), [0, 1]), "differ in length: 4 rows vs 3 labels"),
        ((torch.zeros(4, 3), [1, 1, 1, 1], torch.zeros(2, 3), [0, 1]), "single class"),
        ((torch.zeros(0, 3), [], torch.zeros(2, 3), [0, 1]), "must not be empty"),
        ((torch.zeros(4, 3), [0, 1, 0, 1], torch.zeros(2, 5), [0, 1]), "differ in width: 3 vs 5"),
        ((torch.zeros(4), [0, 1, 0, 1], torch.zeros(2, 3), [0, 1]), "2-D tensor"),
        ((torch.zeros(4, 3), [0.0, 1.0, 0.0, 1.0], torch.zeros(2, 3), [0, 1]), "integer class indices"),
        ((torch.zeros(4, 3), [0, 1, 0, -1], torch.zeros(2, 3), [0, 1]), "class indices >= 0"),
        ((torch.full((4, 3), math.nan), [0, 1, 0, 1], torch.zeros(2, 3), [0, 1]), "NaN or infinite"),
    ],
)
def test_probe_rejects_bad_inputs(arguments, message):
    with pytest.raises(ValueError, match=message):
        fit_linear_probe(*arguments)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"l2_grid": ()}, "non-empty sequence"),
        ({"l2_grid": (1.0, 0.0)}, "positive finite"),
        ({"method": "sgd"}, "method must be one of 'lbfgs', 'adamw'"),
        ({"num_classes": 1}, "too small for class index 1"),
    ],
)
def test_probe_rejects_bad_options(options, message):
    features, labels = blobs(20, 3, 2, noise=0.1, seed=0)
    with pytest.raises(ValueError, match=message):
        fit_linear_probe(features[:10], labels[:10], features[10:], labels[10:], **options)


def test_probe_checks_the_width_of_the_features_it_scores():
    features, labels = blobs(20, 3, 2, noise=0.1, seed=0)
    probe = fit_logistic_regression(features, labels, DEFAULT_L2_GRID[0])
    with pytest.raises(ValueError, match=r"shape \(num_rows, 3\), got \(2, 4\)"):
        probe.predict(torch.zeros(2, 4))


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[XModalModel, XModalProcessor]:
    return XModalModel.from_pretrained(tiny_dir).eval(), XModalProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def scenes() -> Dataset:
    return make_synthetic_dataset(num_train=10, num_validation=0, num_test=0, seed=0, image_size=32)["train"]


def test_features_are_the_models_embeddings_or_its_pooled_tower_outputs(tiny, scenes):
    model, processor = tiny
    images = extract_features(model, processor, scenes, batch_size=4, show_progress=False)
    torch.testing.assert_close(images, embed_images(model, processor, scenes["image"]))
    texts = extract_features(model, processor, scenes, modality="text", batch_size=4, show_progress=False)
    torch.testing.assert_close(texts, embed_texts(model, processor, scenes["text"]))

    pooled = extract_features(model, processor, scenes, pooled=True, batch_size=4, show_progress=False)
    assert pooled.shape == (10, model.config.vision_config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(model.visual_projection(pooled), dim=-1), images)
    pooled_texts = extract_features(model, processor, scenes, modality="text", pooled=True, show_progress=False)
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(model.text_projection(pooled_texts), dim=-1), texts)


def test_feature_cache_skips_the_model_until_the_model_or_the_rows_change(tiny, scenes, tmp_path):
    model = copy.deepcopy(tiny[0])
    processor = tiny[1]
    calls = []
    model.vision_model.register_forward_hook(lambda module, inputs, output: calls.append(len(output[0])))

    def extract(dataset: Dataset = scenes, **options: object) -> torch.Tensor:
        return extract_features(model, processor, dataset, cache_dir=tmp_path, show_progress=False, **options)

    first = extract()
    assert sum(calls) == 10 and len(list(tmp_path.glob(f"{FEATURES_CACHE_PREFIX}*.safetensors"))) == 1
    torch.testing.assert_close(extract(batch_size=3), first)  # from the file: the model is not called
    assert sum(calls) == 10

    extract(pooled=True)  # other options: another file
    extract(scenes.select(range(6)))  # other rows: another file
    assert sum(calls) == 26 and len(list(tmp_path.glob(f"{FEATURES_CACHE_PREFIX}*"))) == 3

    with torch.no_grad():
        model.visual_projection.weight.add_(0.5 * torch.randn_like(model.visual_projection.weight))
    changed = extract()
    assert sum(calls) == 36
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, embed_images(model, processor, scenes["image"]))


def test_extract_features_rejects_bad_inputs(tiny, scenes):
    model, processor = tiny
    with pytest.raises(ValueError, match="modality must be one of 'image', 'text'; got 'audio'"):
        extract_features(model, processor, scenes, modality="audio")
    with pytest.raises(ValueError, match=r"image_column 'picture' is not a column .*'image'"):
        extract_features(model, processor, scenes, image_column="picture")
    with pytest.raises(ValueError, match="empty dataset"):
        extract_features(model, processor, scenes.select([]))
    with pytest.raises(TypeError, match="datasets.Dataset, got list"):
        extract_features(model, processor, list(scenes))
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(model, processor, scenes, batch_size=0)
    with pytest.raises(TypeError, match="visual_projection"):
        extract_features(ColourModel(processor), processor, scenes, pooled=True, show_progress=False)
    broken = Dataset.from_dict(
        {"image": [solid("red"), solid("red")], "_bad": [None, "x.png: not an image"]},
        features=Features({"image": Image(), "_bad": Value("string")}),
    )
    with pytest.raises(ValueError, match=r"Row 1 of the dataset could not be decoded \(x.png: not an image\)"):
        extract_features(model, processor, broken, show_progress=False)


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------------------------


def colour_rows(num_rows: int, seed: int) -> Dataset:
    """Squares of the procedural colours, each shade jittered, labelled with the colour's name."""
    generator = torch.Generator().manual_seed(seed)
    names = list(COLORS)
    images, colours = [], []
    for index in range(num_rows):
        name = names[index % len(names)]
        shift = int(torch.randint(-12, 13, (), generator=generator))
        images.append(solid(name).point(lambda value, shift=shift: min(255, max(0, value + shift))))
        colours.append(name)
    return Dataset.from_dict(
        {"image": images, "colour": colours}, features=Features({"image": Image(), "colour": Value("string")})
    )


def test_linear_probe_evaluation_separates_colours_and_reports_its_choice(tmp_path):
    processor = tiny_processor()
    model = ColourModel(processor)  # an image's feature is its mean normalised colour
    train, test = colour_rows(4 * len(COLORS), seed=0), colour_rows(2 * len(COLORS), seed=1)
    metrics = linear_probe_evaluation(
        model, processor, train, test, "colour", cache_dir=tmp_path, refine_steps=0, show_progress=False
    )
    assert set(metrics) == {
        "linear_probe_accuracy",
        "linear_probe_l2",
        "linear_probe_val_accuracy",
        "linear_probe_train_rows",
    }
    assert metrics["linear_probe_accuracy"] == 1.0 and metrics["linear_probe_val_accuracy"] == 1.0
    assert metrics["linear_probe_l2"] in DEFAULT_L2_GRID and metrics["linear_probe_train_rows"] == len(train)
    assert len(list(tmp_path.glob(f"{FEATURES_CACHE_PREFIX}*"))) == 2

    with pytest.raises(ValueError, match="label_column 'shape' is not a column of train_dataset"):
        linear_probe_evaluation(model, processor, train, test, "shape", show_progress=False)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\)"):
        linear_probe_evaluation(model, processor, train, test, "colour", validation_fraction=1.0)


def test_probe_labels_may_be_class_indices():
    processor = tiny_processor()
    model = ColourModel(processor)
    names = list(COLORS)
    labelled = colour_rows(3 * len(names), seed=2).cast_column("colour", ClassLabel(names=names))
    train, test = labelled.select(range(2 * len(names))), labelled.select(range(2 * len(names), 3 * len(names)))
    metrics = linear_probe_evaluation(model, processor, train, test, "colour", refine_steps=0, show_progress=False)
    assert metrics["linear_probe_accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# xmodal evaluate --linear_probe
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_command_reports_the_linear_probe(tiny_dir, tmp_path, capsys):
    cache = tmp_path / "features"
    command = ["evaluate", "--model", str(tiny_dir), "--num_eval_examples", "12", "--batch_size", "12"]
    command += ["--linear_probe", "--linear_probe_max_train_rows", "30", "--linear_probe_cache_dir", str(cache)]

    def run() -> dict[str, object]:
        assert main(command) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{") :])

    metrics = run()
    assert 0 <= metrics["linear_probe_accuracy"] <= 1 and 0 <= metrics["linear_probe_val_accuracy"] <= 1
    assert metrics["linear_probe_train_rows"] == 30 and metrics["linear_probe_l2"] > 0
    assert "text_to_image_R@1" in metrics  # the other metrics are still there
    assert len(list(cache.glob(f"{FEATURES_CACHE_PREFIX}*"))) == 2  # the 30 training and the 12 test scenes
    again = run()  # features from the cache: the same probe
    assert {key: again[key] for key in metrics if key.startswith("linear_probe")} == {
        key: value for key, value in metrics.items() if key.startswith("linear_probe")
    }


def test_evaluate_command_checks_the_linear_probe_options(tiny_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(tiny_dir), "--linear-probe", "--linear_probe_method", "sgd"])
    assert exit_info.value.code == 2
    assert "--linear_probe_method must be one of lbfgs, adamw, got 'sgd'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(tiny_dir), "--dataset", "my/data", "--linear_probe"])
    assert exit_info.value.code == 2
    assert "--linear_probe_label_column COLUMN" in capsys.readouterr().err
