"""Corpus BLEU (Papineni et al. 2002), as a local `evaluate` metric module.

This file is copied alone into evaluate's module cache: it may import only the standard library, numpy, datasets
and evaluate (one import per line, evaluate's import scanner misreads `import a, b`).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import datasets
import evaluate

_CITATION = """\
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL},
  year={2002}
}
@inproceedings{lin2004orange,
  title={ORANGE: a Method for Evaluating Automatic Evaluation Metrics for Machine Translation},
  author={Lin, Chin-Yew and Och, Franz Josef},
  booktitle={COLING},
  year={2004}
}
"""

_DESCRIPTION = """\
Corpus BLEU: the geometric mean of the clipped (modified) n-gram precisions for n = 1..max_order, each summed over
the whole corpus (not averaged over sentences), times the brevity penalty exp(1 - r / c) when the total candidate
length c is not longer than r, the sum over examples of the reference length closest to the candidate's (the shorter
one on ties). Texts are lowercased and split into words: runs of letters, digits and underscores, optionally joined
by apostrophes (`don't`); all other punctuation is dropped, as coco-caption does for captions. Without smoothing
any zero precision gives BLEU 0; `smooth=True` adds one to the matches and the candidate n-gram count of every order
n > 1 (Lin and Och 2004).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the candidate text of each example.
    references (`list` of `list` of `str`): the reference texts of each example (a list even when there is one).
    max_order (`int`, *optional*, defaults to 4): the longest n-gram (4 gives BLEU-4).
    smooth (`bool`, *optional*, defaults to `False`): add-one smoothing of the precisions of order n > 1.
Returns:
    bleu (`float` in [0, 1]), precisions (`list` of `float`, n = 1..max_order), brevity_penalty (`float`),
    translation_length (`int`, c) and reference_length (`int`, r).
Examples:
    >>> from xmodal.training.evaluation.metrics import load_metric
    >>> metric = load_metric("bleu")  # evaluate.load(<this folder>), offline
    >>> metric.compute(predictions=["the cat sat"], references=[["The cat sat on the mat."]], smooth=True)["bleu"]
    0.36787944117144233
"""

_WORD = re.compile(r"\w+(?:'\w+)*")


def tokenize(text: str) -> list[str]:
    """Lowercased words of `text`, punctuation dropped: `"Don't stop, Bob!"` -> `["don't", "stop", "bob"]`."""
    return _WORD.findall(text.lower())


def ngram_counts(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of the n-grams of `tokens`."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    """Corpus BLEU with clipped n-gram precisions and the closest-reference brevity penalty."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
            ),
            reference_urls=["https://aclanthology.org/P02-1040/", "https://aclanthology.org/C04-1072/"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[list[str]],
        max_order: int = 4,
        smooth: bool = False,
    ) -> dict[str, object]:
        if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 1:
            raise ValueError(f"max_order must be a positive integer, got {max_order!r}.")
        if len(predictions) == 0:
            raise ValueError("bleu got no predictions: pass one candidate string per example.")
        empty = [index for index, texts in enumerate(references) if len(texts) == 0]
        if empty:
            raise ValueError(f"bleu needs at least one reference per example, none for examples {empty[:5]}.")
        matches, totals = [0] * max_order, [0] * max_order
        candidate_length = reference_length = 0
        for prediction, texts in zip(predictions, references):
            candidate = tokenize(prediction)
            tokenized_refs = [tokenize(text) for text in texts]
            candidate_length += len(candidate)
            reference_length += min((len(ref) for ref in tokenized_refs), key=lambda n: (abs(n - len(candidate)), n))
            for n in range(1, max_order + 1):
                max_ref_counts: Counter[tuple[str, ...]] = Counter()
                for ref in tokenized_refs:
                    max_ref_counts |= ngram_counts(ref, n)
                matches[n - 1] += sum((ngram_counts(candidate, n) & max_ref_counts).values())
                totals[n - 1] += max(len(candidate) - n + 1, 0)
        add = [int(smooth and index > 0) for index in range(max_order)]  # index 0 holds the unigrams
        precisions = [(m + a) / (t + a) if t + a > 0 else 0.0 for m, t, a in zip(matches, totals, add)]
        if candidate_length == 0:
            brevity_penalty = 0.0
        else:
            brevity_penalty = min(1.0, math.exp(1 - reference_length / candidate_length))
        geometric_mean = math.exp(sum(map(math.log, precisions)) / max_order) if min(precisions) > 0 else 0.0
        return {
            "bleu": geometric_mean * brevity_penalty,
            "precisions": precisions,
            "brevity_penalty": brevity_penalty,
            "translation_length": candidate_length,
            "reference_length": reference_length,
        }


__all__ = ["Bleu", "ngram_counts", "tokenize"]
