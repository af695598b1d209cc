"""CIDEr-D (Vedantam et al. 2015) as computed by the coco-caption toolkit, as a local `evaluate` metric module.

This file is copied alone into evaluate's module cache: it may import only the standard library, numpy, datasets
and evaluate (one import per line, evaluate's import scanner misreads `import a, b`). The tokenisation is the one
of the sibling `bleu` module, restated here because such a module cannot import another.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""

_DESCRIPTION = """\
CIDEr-D, as in the coco-caption reference implementation (pycocoevalcap `cider_scorer.py`): every caption becomes
TF-IDF vectors of its n-grams, n = 1..4, with raw n-gram counts as term frequencies and document frequencies
counted over the reference sets of the evaluated corpus (idf = log(#examples) - log(max(1, df))). For each order
the candidate-reference similarity is the cosine with a clipped numerator, sum of min(candidate, reference) x
reference weights, times a Gaussian length penalty exp(-(len_c - len_r)^2 / (2 sigma^2)), sigma = 6; the score of
an example is 10 x the mean over orders, averaged over its references; `cider` is the mean over examples.
Consequences of the definition: an n-gram found in every example's references has idf 0 and counts for nothing,
a one-example corpus always scores 0, and a candidate equal to all of its references scores 10 when each of its
orders has a non-zero idf weight. Texts are lowercased and split into words (runs of letters, digits and
underscores, optionally joined by apostrophes); other punctuation is dropped, like coco-caption's PTB tokenisation.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the candidate caption of each example.
    references (`list` of `list` of `str`): the reference captions of each example (a list even when there is one).
    sigma (`float`, *optional*, defaults to 6.0): standard deviation of the Gaussian length penalty.
Returns:
    cider (`float` in [0, 10]): the clipped cosines are at most 1.
Examples:
    >>> from xmodal.training.evaluation.metrics import load_metric
    >>> metric = load_metric("cider")  # evaluate.load(<this folder>), offline
    >>> captions = ["a red circle on the left", "two blue squares at the top"]
    >>> metric.compute(predictions=captions, references=[[caption] for caption in captions])
    {'cider': 10.0}
"""

_MAX_ORDER = 4
_WORD = re.compile(r"\w+(?:'\w+)*")


@dataclass
class _TfIdf:
    """A caption as CIDEr sees it: one `{ngram: tf-idf weight}` per order n = 1..4, their L2 norms `(4,)` and the
    number of words."""

    vectors: list[dict[tuple[str, ...], float]]
    norms: np.ndarray
    length: int


def _ngram_counts(text: str) -> tuple[Counter[tuple[str, ...]], int]:
    """Counts of all n-grams (n = 1..4) of the lowercased words of `text`, and its number of words."""
    words = _WORD.findall(text.lower())
    counts = Counter(tuple(words[i : i + n]) for n in range(1, _MAX_ORDER + 1) for i in range(len(words) - n + 1))
    return counts, len(words)


def _tfidf(
    counts: Counter[tuple[str, ...]], length: int, document_frequency: Counter[tuple[str, ...]], num_documents: int
) -> _TfIdf:
    """TF-IDF vectors of one caption's n-gram counts: weight = count x (log(num_documents) - log(max(1, df)))."""
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(_MAX_ORDER)]
    for ngram, count in counts.items():
        idf = math.log(num_documents) - math.log(max(1.0, document_frequency[ngram]))
        vectors[len(ngram) - 1][ngram] = count * idf
    norms = np.array([math.sqrt(sum(weight**2 for weight in vector.values())) for vector in vectors])
    return _TfIdf(vectors, norms, length)


def _similarity(candidate: _TfIdf, reference: _TfIdf, sigma: float) -> float:
    """CIDEr-D similarity of a candidate and one reference (before the x10): the mean over orders of the cosine with
    a clipped numerator, times the Gaussian length penalty."""
    # coco-caption measures lengths in bigrams (words - 1): the same difference whenever the similarity can be > 0
    penalty = math.exp(-((candidate.length - reference.length) ** 2) / (2 * sigma**2))
    total = 0.0
    for c_vector, r_vector, c_norm, r_norm in zip(
        candidate.vectors, reference.vectors, candidate.norms, reference.norms
    ):
        if c_norm > 0 and r_norm > 0:  # a zero norm means all-zero weights: the numerator is 0 as well
            numerator = sum(
                min(weight, r_vector.get(ngram, 0.0)) * r_vector.get(ngram, 0.0) for ngram, weight in c_vector.items()
            )
            total += numerator / (c_norm * r_norm)
    return penalty * total / _MAX_ORDER


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cider(evaluate.Metric):
    """CIDEr-D of candidate captions against reference captions, document frequencies from the references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
            ),
            reference_urls=["https://arxiv.org/abs/1411.5726", "https://github.com/tylin/coco-caption"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> dict[str, float]:
        if not sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}.")
        if len(predictions) == 0:
            raise ValueError("cider got no predictions: pass one candidate caption per example.")
        empty = [index for index, texts in enumerate(references) if len(texts) == 0]
        if empty:
            raise ValueError(f"cider needs at least one reference per example, none for examples {empty[:5]}.")
        reference_counts = [[_ngram_counts(text) for text in texts] for texts in references]
        document_frequency = Counter(
            ngram for example in reference_counts for ngram in set().union(*(counts for counts, _ in example))
        )
        scores = []
        for prediction, example in zip(predictions, reference_counts):
            candidate = _tfidf(*_ngram_counts(prediction), document_frequency, len(predictions))
            similarities = [
                _similarity(candidate, _tfidf(counts, length, document_frequency, len(predictions)), sigma)
                for counts, length in example
            ]
            scores.append(10.0 * sum(similarities) / len(similarities))
        return {"cider": float(np.mean(scores))}


__all__ = ["Cider"]
