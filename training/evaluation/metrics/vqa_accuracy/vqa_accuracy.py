"""VQA accuracy (Antol et al. 2015, the VQA v2 evaluation), as a local `evaluate` metric module.

This file is copied alone into evaluate's module cache: it may import only the standard library, numpy, datasets
and evaluate (one import per line, evaluate's import scanner misreads `import a, b`).
"""

from __future__ import annotations

import re

import datasets
import evaluate

_CITATION = """\
@inproceedings{antol2015vqa,
  title={VQA: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and
          Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
"""

_DESCRIPTION = """\
VQA accuracy: an answer is fully right when at least 3 humans gave it, min(#matching humans / 3, 1). As in the
official VQA v2 evaluation, with n >= 2 reference answers (10 in VQA v2) the score is averaged over the n subsets
that leave one human out, so 1, 2, 3 and 4+ matches out of 10 score 0.3, 0.6, 0.9 and 1.0. A single reference is
exact match. Answers are normalised as in the official evaluation: lowercase; punctuation removed (or turned into
a space inside a word, `t-shirt` -> `t shirt`; commas between digits and periods not followed by a digit dropped);
number words zero..ten and `none` turned into digits; articles a/an/the dropped. Differences from the official
script: the official contraction table (`dont` -> `don't`, ...) is not applied, and references get the same full
normalisation as predictions (the official script only strips their punctuation, and only when they disagree).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the predicted answer of each question.
    references (`list` of `list` of `str`): the human answers of each question (VQA v2: 10; a list even when
        there is a single answer).
Returns:
    accuracy (`float` in [0, 1]): the mean VQA accuracy over questions.
Examples:
    >>> from xmodal.training.evaluation.metrics import load_metric
    >>> metric = load_metric("vqa_accuracy")  # evaluate.load(<this folder>), offline
    >>> metric.compute(predictions=["Two.", "red"], references=[["2"] * 10, ["red"] * 2 + ["blue"] * 8])
    {'accuracy': 0.8}
"""

_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # the official list (apostrophes and colons stay)
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    word: str(value) for value, word in enumerate("zero one two three four five six seven eight nine ten".split())
}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation of an answer (without the contraction table), e.g. `"The two dogs."` -> `"2
    dogs"`."""
    text = " ".join(answer.lower().split())
    drop = bool(_COMMA_IN_NUMBER.search(text))
    for mark in _PUNCTUATION:
        # a mark next to a space (or any mark in a text with 1,000-style numbers) goes; inside a word it splits it
        text = text.replace(mark, "" if drop or f"{mark} " in text or f" {mark}" in text else " ")
    words = (_NUMBER_WORDS.get(word, word) for word in _PERIOD.sub("", text).split())
    return " ".join(word for word in words if word not in _ARTICLES)


def vqa_score(prediction: str, references: list[str]) -> float:
    """VQA accuracy of one answer: `min(matches / 3, 1)` averaged over the leave-one-human-out subsets (exact match
    for a single reference)."""
    answer = normalize_answer(prediction)
    matches = [normalize_answer(reference) == answer for reference in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    """Mean VQA accuracy of predicted answers against human answers."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
            ),
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("vqa_accuracy got no predictions: pass one answer string per question.")
        empty = [index for index, answers in enumerate(references) if len(answers) == 0]
        if empty:
            raise ValueError(f"vqa_accuracy needs at least one reference answer per question, none for {empty[:5]}.")
        scores = [vqa_score(prediction, answers) for prediction, answers in zip(predictions, references)]
        return {"accuracy": sum(scores) / len(scores)}


__all__ = ["VqaAccuracy", "normalize_answer", "vqa_score"]
