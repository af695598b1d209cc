"""The local `evaluate` metric modules of xmodal.training.evaluation.metrics, loaded offline, against hand-computed values."""

from __future__ import annotations

import ast
import doctest
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
import torch

from xmodal.training.evaluation.evaluator import retrieval_metrics
from xmodal.training.evaluation.metrics import METRICS, load_metric, metric_path


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the Hugging Face Hub: the metrics are local modules."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")


def load(name: str) -> evaluate.EvaluationModule:
    """The metric loaded from its folder; kept in memory (evaluate's cache-file locks outlive a failed compute and
    make the next load wait a second)."""
    return evaluate.load(metric_path(name), keep_in_memory=True)


# ---------------------------------------------------------------------------------------------------------- package


def test_metric_path_and_load_metric():
    for name in METRICS:
        folder = Path(metric_path(name))
        assert (folder / f"{name}.py").is_file()
        metric = load_metric(name)
        assert isinstance(metric, evaluate.Metric) and metric.name == name
    with pytest.raises(ValueError, match="accepted names: retrieval_recall, zero_shot_accuracy"):
        metric_path("accuracy")


@pytest.mark.parametrize("name", METRICS)
def test_metric_modules_import_only_what_evaluate_can_copy(name):
    # evaluate copies the file alone into its cache and scans `import a, b` wrongly: one stdlib/numpy/datasets/
    # evaluate import per statement, no relative or xmodal imports
    tree = ast.parse(Path(metric_path(name), f"{name}.py").read_text())
    allowed = set(sys.stdlib_module_names) | {"numpy", "datasets", "evaluate"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert len(node.names) == 1, f"{name}.py line {node.lineno}: one import per line"
            assert node.names[0].name.split(".")[0] in allowed
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module.split(".")[0] in allowed, f"{name}.py line {node.lineno}"


@pytest.mark.slow  # importing evaluate in a fresh process takes 10-20 s on 2 cores
def test_metrics_load_in_a_fresh_process_without_the_hub(tmp_path):
    # empty HF cache, offline, and an endpoint that refuses connections: only local files can be used
    script = (
        "import json, sys, evaluate\n"
        "paths = json.loads(sys.argv[1])\n"
        "print(json.dumps({name: evaluate.load(path).name for name, path in paths.items()}))\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    paths = {name: metric_path(name) for name in METRICS}
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(paths)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {name: name for name in METRICS}


@pytest.mark.parametrize("name", METRICS)
def test_docstring_examples_are_right(name):
    metric = load(name)
    assert "Examples:" in metric.inputs_description and metric.citation and metric.description
    example = doctest.DocTestParser().get_doctest(metric.inputs_description, {}, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(example)
    assert (runner.failures, runner.tries) == (0, len(example.examples)) and runner.tries >= 3


BATCH_INPUTS = {
    "retrieval_recall": (
        [[0.9, 0.1, 0.3], [0.2, 0.2, 0.1], [0.0, 0.5, 0.4], [0.3, 0.2, 0.1], [0.1, 0.1, 0.1]],
        [0, 1, 2, 2, 1],
        {"ks": (1, 2)},
    ),
    "zero_shot_accuracy": ([[0.9, 0.1, 0.3], [0.2, 0.2, 0.1], [0.0, 0.5, 0.4], [0.3, 0.2, 0.1]], [0, 1, 2, 2], {}),
    "vqa_accuracy": (["two", "red", "yes", "no"], [["2"] * 3 + ["3"] * 7, ["red"], ["yes"] * 10, ["yes"]], {}),
    "bleu": (
        ["a red circle on the left", "two blue squares", "a green triangle above a circle"],
        [["a red circle at the left"], ["two blue squares", "blue squares"], ["a triangle above a green circle"]],
        {"smooth": True},
    ),
    "cider": (
        ["a red circle on the left", "two blue squares", "a green triangle above a circle"],
        [["a red circle at the left"], ["two blue squares", "blue squares"], ["a triangle above a green circle"]],
        {},
    ),
}


@pytest.mark.parametrize("name", METRICS)
def test_add_batch_in_several_batches_equals_one_compute(name):
    predictions, references, kwargs = BATCH_INPUTS[name]
    expected = load(name).compute(predictions=predictions, references=references, **kwargs)
    metric = evaluate.load(metric_path(name))  # batches go through evaluate's Arrow cache file, as in training
    for start in range(0, len(predictions), 2):
        metric.add_batch(predictions=predictions[start : start + 2], references=references[start : start + 2])
    result = metric.compute(**kwargs)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value)
    assert all(value > 0 for value in expected.values() if isinstance(value, float))


# ------------------------------------------------------------------------------------------------ retrieval_recall


def test_retrieval_recall_known_ranks():
    # the true item of query i is ranked i + 1
    scores = [[0.9, 0.1, 0.2, 0.0], [0.8, 0.7, 0.1, 0.0], [0.1, 0.9, 0.5, 0.8], [0.4, 0.3, 0.2, 0.1]]
    metric = load("retrieval_recall")
    result = metric.compute(predictions=scores, references=[0, 1, 2, 3], ks=[1, 2, 3])
    assert result == pytest.approx({"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "mean_rank": 2.5, "median_rank": 2.5})
    default = metric.compute(predictions=scores, references=[0, 1, 2, 3])
    assert default == pytest.approx({"R@1": 0.25, "R@5": 1.0, "R@10": 1.0, "mean_rank": 2.5, "median_rank": 2.5})


def test_retrieval_recall_ties_count_against_the_model():
    metric = load("retrieval_recall")
    collapsed = metric.compute(predictions=[[0.5] * 4] * 3, references=[0, 1, 3], ks=[1, 3, 4])
    assert collapsed == pytest.approx({"R@1": 0.0, "R@3": 0.0, "R@4": 1.0, "mean_rank": 4.0, "median_rank": 4.0})
    # one tie with a wrong item: rank 2, not 1
    tied = metric.compute(predictions=[[0.7, 0.7, 0.1]], references=[1], ks=[1, 2])
    assert tied == pytest.approx({"R@1": 0.0, "R@2": 1.0, "mean_rank": 2.0, "median_rank": 2.0})


def test_retrieval_metrics_agree_with_ranks_computed_in_torch_in_both_directions():
    generator = torch.Generator().manual_seed(0)
    # rounded to 1 decimal so that ties happen
    logits_per_text = (torch.randn(12, 12, generator=generator) * 3).round() / 10
    metrics = retrieval_metrics(logits_per_text, ks=(1, 5, 10))
    for direction, scores in (("text_to_image", logits_per_text), ("image_to_text", logits_per_text.t())):
        # independent reference: rank = candidates scoring at least as high as the true match
        ranks = (scores >= scores.diagonal().unsqueeze(1)).sum(dim=1).double()
        for k in (1, 5, 10):
            assert metrics[f"{direction}_R@{k}"] == pytest.approx((ranks <= k).double().mean().item())
        assert metrics[f"{direction}_mean_rank"] == pytest.approx(ranks.mean().item())
        assert metrics[f"{direction}_median_rank"] == pytest.approx(ranks.quantile(0.5).item())


@pytest.mark.parametrize(
    ("name", "predictions", "references", "kwargs", "message"),
    [
        ("retrieval_recall", [], [], {}, "no predictions"),
        ("retrieval_recall", [[0.1, 0.2]], [0, 1], {}, "Mismatch in the number of predictions"),
        ("retrieval_recall", [[0.1, 0.2], [0.3]], [0, 0], {}, r"same non-empty gallery, got rows of lengths \[1, 2\]"),
        ("retrieval_recall", [[0.1, float("nan")]], [0], {}, "non-finite"),
        ("retrieval_recall", [[0.1, float("inf")]], [0], {}, "non-finite"),
        ("retrieval_recall", [[0.1, 0.2]], [2], {}, r"gallery indices in \[0, 2\), got \[2\]"),
        ("retrieval_recall", [[0.1, 0.2]], [-1], {}, r"gallery indices in \[0, 2\), got \[-1\]"),
        ("retrieval_recall", [[0.1, 0.2]], [0], {"ks": [0]}, "ks must be positive integers"),
        ("retrieval_recall", [[0.1, 0.2]], [0], {"ks": []}, "ks must be positive integers"),
        ("zero_shot_accuracy", [], [], {}, "no predictions"),
        ("zero_shot_accuracy", [[0.1, 0.2, 0.3]], [3], {}, r"class ids in \[0, 3\), got \[3\]"),
        ("zero_shot_accuracy", [[0.1, float("-inf")]], [0], {}, "non-finite"),
        ("zero_shot_accuracy", [[0.1, 0.2], [0.3]], [0, 0], {}, "same non-empty set of classes"),
        ("zero_shot_accuracy", [[0.1, 0.2]], [0], {"ks": [1.5]}, "ks must be positive integers"),
        ("vqa_accuracy", [], [], {}, "no predictions"),
        ("vqa_accuracy", ["yes", "no"], [["yes"], []], {}, r"at least one reference answer .* none for \[1\]"),
        ("vqa_accuracy", ["yes"], [["yes"], ["no"]], {}, "Mismatch in the number of predictions"),
        ("vqa_accuracy", ["yes"], ["yes"], {}, "expected a list"),
        ("bleu", [], [], {}, "no predictions"),
        ("bleu", ["a cat"], [[]], {}, r"at least one reference .* none for examples \[0\]"),
        ("bleu", ["a cat"], [["a cat"]], {"max_order": 0}, "max_order must be a positive integer"),
        ("bleu", ["a cat"], ["a cat"], {}, "expected a list"),
        ("cider", [], [], {}, "no predictions"),
        ("cider", ["a cat", "a dog"], [["a cat"], []], {}, r"at least one reference .* none for examples \[1\]"),
        ("cider", ["a cat"], [["a cat"]], {"sigma": 0.0}, "sigma must be a positive number"),
    ],
)
def test_bad_inputs_raise_clear_errors(name, predictions, references, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load(name).compute(predictions=predictions, references=references, **kwargs)


# ---------------------------------------------------------------------------------------------- zero_shot_accuracy


def test_zero_shot_accuracy_top1_top5():
    # 7 classes; the true class is ranked 1st, 3rd, 6th, and tied with one other for 1st (rank 2)
    scores = [
        [0.9, 0.1, 0.2, 0.3, 0.0, 0.1, 0.2],
        [0.9, 0.8, 0.7, 0.1, 0.0, 0.1, 0.2],
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
        [0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
    ]
    result = load("zero_shot_accuracy").compute(predictions=scores, references=[0, 2, 5, 1])
    assert result == pytest.approx({"top1": 0.25, "top5": 0.75})


def test_zero_shot_accuracy_with_fewer_classes_than_k():
    metric = load("zero_shot_accuracy")
    result = metric.compute(predictions=[[0.2, 0.5, 0.3], [0.1, 0.1, 0.1]], references=[0, 2], ks=[1, 2, 5])
    # ranks 3 (last) and 3 (all tied): wrong at k = 1 and 2, but k = 5 covers all 3 classes
    assert result == pytest.approx({"top1": 0.0, "top2": 0.0, "top5": 1.0})


# -------------------------------------------------------------------------------------------------- vqa_accuracy


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_with_ten_answers(matches, expected):
    # the official average over the 10 leave-one-annotator-out subsets of min(#matches / 3, 1)
    references = [["2"] * matches + ["3"] * (10 - matches)]
    result = load("vqa_accuracy").compute(predictions=["two"], references=references)
    assert result["accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Two", "2", 1.0),
        ("none", "0", 1.0),
        ("The dog.", "dog", 1.0),
        ("an apple", "apple", 1.0),
        ("T-shirt", "t shirt", 1.0),
        ("Yes!", "yes", 1.0),
        ("yes, it is", "yes it is", 1.0),
        ("1,000", "1000", 1.0),
        ("3.5", "3.5", 1.0),
        ("3.5", "35", 0.0),
        ("no", "yes", 0.0),
        ("dogs", "dog", 0.0),
    ],
)
def test_vqa_accuracy_normalises_answers(prediction, reference, expected):
    # a single reference: exact match after normalisation
    assert load("vqa_accuracy").compute(predictions=[prediction], references=[[reference]])["accuracy"] == expected


def test_vqa_accuracy_averages_over_questions():
    result = load("vqa_accuracy").compute(
        predictions=["red", "2", "yes"], references=[["red"] * 2 + ["blue"] * 8, ["two"], ["no"] * 10]
    )
    assert result["accuracy"] == pytest.approx((0.6 + 1.0 + 0.0) / 3)


# ---------------------------------------------------------------------------------------------------------- bleu


def test_bleu_perfect_match_is_one():
    result = load("bleu").compute(
        predictions=["The cat is on the mat.", "a dog runs in the park"],
        references=[["the cat is on the mat"], ["a dog runs in the park", "a dog is running"]],
    )
    assert result["bleu"] == pytest.approx(1.0)
    assert result["precisions"] == pytest.approx([1.0] * 4)
    assert result["brevity_penalty"] == 1.0


def test_bleu_clips_counts_papineni_example():
    # Papineni et al. 2002, section 2.1: modified unigram precision of "the the the the the the the" is 2/7
    result = load("bleu").compute(
        predictions=["the the the the the the the"],
        references=[["The cat is on the mat.", "There is a cat on the mat."]],
        max_order=1,
    )
    assert result["precisions"] == pytest.approx([2 / 7])
    assert result["bleu"] == pytest.approx(2 / 7)


# the example of nltk.translate.bleu_score.corpus_bleu / sentence_bleu (documented values 0.5920... and 0.5045...)
HYPOTHESIS_1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
REFERENCES_1 = [
    "It is a guide to action that ensures that the military will forever heed Party commands",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party",
    "It is the practical guide for the army always to heed the directions of the party",
]
HYPOTHESIS_2 = "he read the book because he was interested in world history"
REFERENCES_2 = ["he was interested in world history because he read the book"]


def test_bleu_matches_the_nltk_documentation_examples():
    metric = load("bleu")
    sentence = metric.compute(predictions=[HYPOTHESIS_1], references=[REFERENCES_1])
    # nltk modified_precision docs: 17/18 unigrams and 10/17 bigrams are matched
    assert sentence["precisions"][:2] == pytest.approx([17 / 18, 10 / 17])
    assert sentence["bleu"] == pytest.approx(0.5045, abs=1e-4)
    corpus = metric.compute(predictions=[HYPOTHESIS_1, HYPOTHESIS_2], references=[REFERENCES_1, REFERENCES_2])
    assert corpus["bleu"] == pytest.approx(0.5920, abs=1e-4)


def test_bleu_brevity_penalty_and_smoothing_by_hand():
    metric = load("bleu")
    # 3 words against 6: every n-gram matches, but there is no 4-gram, so unsmoothed BLEU-4 is 0
    short = metric.compute(predictions=["the cat sat"], references=[["the cat sat on the mat"]])
    assert short["precisions"] == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert short["brevity_penalty"] == pytest.approx(math.exp(1 - 6 / 3))
    assert short["bleu"] == 0.0
    # add-one smoothing for n > 1 only: p4 = (0 + 1) / (0 + 1)
    smoothed = metric.compute(predictions=["the cat sat"], references=[["the cat sat on the mat"]], smooth=True)
    assert smoothed["bleu"] == pytest.approx(math.exp(1 - 6 / 3))
    # "the cat sat down": unigrams 3/4, bigrams 2/3 -> (2+1)/(3+1), trigrams 1/2 -> 2/3, 4-grams 0/1 -> 1/2
    partial = metric.compute(predictions=["the cat sat down"], references=[["the cat sat on the mat"]], smooth=True)
    assert partial["precisions"] == pytest.approx([3 / 4, 3 / 4, 2 / 3, 1 / 2])
    expected = math.exp(1 - 6 / 4) * (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4)
    assert partial["bleu"] == pytest.approx(expected)
    # unigrams are never smoothed: no word in common gives 0
    assert metric.compute(predictions=["dog"], references=[["cat"]], smooth=True)["bleu"] == 0.0


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    metric = load("bleu")
    # 3 words: the 2-word reference is closer than the 6-word one, and the candidate is longer, so no penalty
    closest = metric.compute(predictions=["the cat sat"], references=[["the cat", "the cat sat on the mat"]])
    assert (closest["reference_length"], closest["brevity_penalty"]) == (2, 1.0)
    # 4 words, 2 and 6 are as close: the shorter one counts
    tie = metric.compute(predictions=["the cat sat down"], references=[["the cat", "the cat sat on the mat"]])
    assert (tie["reference_length"], tie["brevity_penalty"]) == (2, 1.0)
    # corpus level: c = 3 + 2 = 5, r = 6 + 5 = 11
    corpus = metric.compute(
        predictions=["the cat sat", "a dog"], references=[["the cat sat on the mat"], ["a dog in a park"]]
    )
    assert (corpus["translation_length"], corpus["reference_length"]) == (5, 11)
    assert corpus["brevity_penalty"] == pytest.approx(math.exp(1 - 11 / 5))


def test_bleu_ignores_case_and_punctuation():
    metric = load("bleu")
    result = metric.compute(predictions=["The cat, on the MAT!"], references=[["the cat on the mat"]])
    assert result["bleu"] == pytest.approx(1.0)
    assert result["translation_length"] == 5


# --------------------------------------------------------------------------------------------------------- cider

CAPTIONS = ["a red circle on the left", "two blue squares at the top", "a green triangle below a yellow star"]


def test_cider_candidates_equal_to_their_references_score_ten():
    result = load("cider").compute(predictions=CAPTIONS, references=[[caption] * 3 for caption in CAPTIONS])
    assert result["cider"] == pytest.approx(10.0)
    # a one-example corpus has idf log(1) - log(1) = 0 everywhere: CIDEr is 0 by definition
    assert load("cider").compute(predictions=CAPTIONS[:1], references=[CAPTIONS[:1]])["cider"] == 0.0


def test_cider_unrelated_candidates_score_zero():
    result = load("cider").compute(
        predictions=["purple hexagons everywhere", "nothing here", "an orange cat sleeping"],
        references=[[caption] for caption in CAPTIONS],
    )
    assert result["cider"] == 0.0


def test_cider_ranks_better_captions_higher():
    metric = load("cider")
    references = [[caption, caption.replace(" a ", " one ")] for caption in CAPTIONS]
    good = ["a red circle on the left side", "two blue squares at the top", "a green triangle below a star"]
    fair = ["a red circle", "two squares", "a triangle"]
    bad = ["a blue square on the right", "three green circles", "a star"]
    scores = [metric.compute(predictions=p, references=references)["cider"] for p in (good, fair, bad)]
    assert scores[0] > scores[1] > scores[2] > 0
    # clipping and the length penalty: repeating the reference scores lower than the reference itself
    repeated = metric.compute(predictions=[f"{c} {c}" for c in CAPTIONS], references=references)["cider"]
    exact = metric.compute(predictions=CAPTIONS, references=references)["cider"]
    assert repeated < exact


def test_cider_by_hand():
    # 2 examples, 2-word captions: every reference n-gram has df 1, idf log(2); orders 3 and 4 are empty (0)
    metric = load("cider")
    references = [["red circle"], ["blue square"]]
    # "red square" vs "red circle": unigram cosine (log2)^2 / (sqrt(2) log2)^2 = 1/2, bigram 0 -> 10 * 0.5 / 4
    # "blue square" is its reference: unigram and bigram cosines 1 -> 10 * 2 / 4
    result = metric.compute(predictions=["red square", "blue square"], references=references)
    assert result["cider"] == pytest.approx((10 * 0.5 / 4 + 10 * 2 / 4) / 2)
    # clipping: "red red circle" has unigram weights red 2 log2, circle log2 (norm sqrt(5) log2) and the reference
    # red log2, circle log2: numerator min(2, 1) + min(1, 1) = 2 (log2)^2, not 3; bigrams "red red", "red circle"
    # against "red circle": cosine 1/sqrt(2); one word longer: penalty exp(-1/72)
    clipped = metric.compute(predictions=["red red circle", "blue square"], references=references)
    first = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
    assert clipped["cider"] == pytest.approx((first + 10 * 2 / 4) / 2)
    # "red" vs "red circle": unigram cosine 1/sqrt(2), length difference 1 -> penalty exp(-1 / (2 sigma^2))
    for sigma in (6.0, 1.0):
        short = metric.compute(predictions=["red", "blue square"], references=references, sigma=sigma)
        expected = (10 * math.exp(-1 / (2 * sigma**2)) / math.sqrt(2) / 4 + 10 * 2 / 4) / 2
        assert short["cider"] == pytest.approx(expected)
