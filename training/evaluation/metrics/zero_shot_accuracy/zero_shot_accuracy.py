"""Top-k accuracy of zero-shot (or any score-based) classification, as a local `evaluate` metric module.

This file is copied alone into evaluate's module cache: it may import only the standard library, numpy, datasets
and evaluate (one import per line, evaluate's import scanner misreads `import a, b`). The ranking rule is the one of
the sibling `retrieval_recall` module, restated here because such a module cannot import another.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{radford2021learning,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and
          Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and
          Krueger, Gretchen and Sutskever, Ilya},
  booktitle={ICML},
  year={2021}
}
"""

_DESCRIPTION = """\
Top-k accuracy of classification from per-class scores (e.g. image-prompt similarities of zero-shot CLIP-style
classification): an example is correct at k when its true class is among the k highest scored. Ties count against
the model: the rank of the true class is the number of classes scoring at least as high, so a collapsed model (all
scores equal) is never right unless k covers every class. k larger than the number of classes means every class.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per example, the score of every class (all rows the same
        length, the number of classes C; higher is more likely).
    references (`list` of `int`): the true class of each example, in [0, C).
    ks (`Sequence[int]`, *optional*, defaults to `(1, 5)`): the k of each top-k accuracy.
Returns:
    `top{k}` (`float` in [0, 1]) for each k: `top1` and `top5` by default.
Examples:
    >>> from xmodal.training.evaluation.metrics import load_metric
    >>> metric = load_metric("zero_shot_accuracy")  # evaluate.load(<this folder>), offline
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.3, 0.3, 0.4]], references=[1, 0])
    {'top1': 0.5, 'top5': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotAccuracy(evaluate.Metric):
    """Top-k accuracy from per-class scores, ties counted against the model."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.List(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self, predictions: list[list[float]], references: list[int], ks: Sequence[int] = (1, 5)
    ) -> dict[str, float]:
        ks = (ks,) if isinstance(ks, int) else tuple(ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {ks!r}.")
        if len(predictions) == 0:
            raise ValueError("zero_shot_accuracy got no predictions: pass one row of class scores per example.")
        sizes = sorted({len(row) for row in predictions})
        if len(sizes) != 1 or sizes[0] == 0:
            raise ValueError(
                f"every example must score the same non-empty set of classes, got rows of lengths {sizes}."
            )
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if not np.isfinite(scores).all():
            raise ValueError("zero_shot_accuracy got non-finite class scores (NaN or inf).")
        out_of_range = labels[(labels < 0) | (labels >= scores.shape[1])]
        if out_of_range.size:
            raise ValueError(
                f"references must be class ids in [0, {scores.shape[1]}), got {out_of_range[:5].tolist()}."
            )
        true_scores = scores[np.arange(len(labels)), labels]
        ranks = (scores >= true_scores[:, None]).sum(axis=1)  # in [1, C], so k > C already means every class
        return {f"top{k}": float((ranks <= k).mean()) for k in ks}


__all__ = ["ZeroShotAccuracy"]
