"""Recall@K, mean and median rank of retrieval (text->image or image->text), as a local `evaluate` metric module.

This file is copied alone into evaluate's module cache: it may import only the standard library, numpy, datasets
and evaluate (one import per line, evaluate's import scanner misreads `import a, b`).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{karpathy2015deep,
  title={Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li},
  booktitle={CVPR},
  year={2015}
}
"""

_DESCRIPTION = """\
Recall@K of a retrieval task: the fraction of queries whose true gallery item is among the K highest scored, plus
the mean and median rank of the true item (rank 1 is best). Ties count against the model: the rank is the number of
gallery items scoring at least as high as the true one, so a collapsed model (all scores equal) ranks last.
Image-text retrieval is two calls: rows of text->image scores, then rows of image->text scores.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per query, the score of every gallery item (all rows the
        same length, the gallery size G; higher is more similar).
    references (`list` of `int`): index in [0, G) of the true gallery item of each query.
    ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`): the cut-offs K of Recall@K.
Returns:
    `R@K` (`float` in [0, 1]) for each K, `mean_rank` and `median_rank` (`float`, rank 1 is best).
Examples:
    >>> from xmodal.training.evaluation.metrics import load_metric
    >>> metric = load_metric("retrieval_recall")  # evaluate.load(<this folder>), offline
    >>> metric.compute(predictions=[[0.9, 0.1, 0.0], [0.5, 0.2, 0.5]], references=[0, 2], ks=[1, 2])
    {'R@1': 0.5, 'R@2': 1.0, 'mean_rank': 1.5, 'median_rank': 1.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Recall@K and the mean/median rank of the true gallery item, ties counted against the model."""

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
        self, predictions: list[list[float]], references: list[int], ks: Sequence[int] = (1, 5, 10)
    ) -> dict[str, float]:
        ks = (ks,) if isinstance(ks, int) else tuple(ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {ks!r}.")
        ranks = _true_ranks(predictions, references)
        metrics = {f"R@{k}": float((ranks <= k).mean()) for k in ks}
        metrics["mean_rank"] = float(ranks.mean())
        metrics["median_rank"] = float(np.median(ranks))
        return metrics


def _true_ranks(predictions: list[list[float]], references: list[int]) -> np.ndarray:
    """Rank (from 1) of each query's true item: the number of gallery items scoring at least as high.

    Args:
        predictions (`list` of `list` of `float`): `(num_queries, gallery_size)` scores.
        references (`list` of `int`): `(num_queries,)` indices of the true items.

    Returns:
        `np.ndarray` of shape `(num_queries,)`, int ranks in [1, gallery_size].
    """
    if len(predictions) == 0:
        raise ValueError("retrieval_recall got no predictions: pass one row of gallery scores per query.")
    sizes = sorted({len(row) for row in predictions})
    if len(sizes) != 1 or sizes[0] == 0:
        raise ValueError(f"every query must score the same non-empty gallery, got rows of lengths {sizes}.")
    scores = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(references, dtype=np.int64)
    if not np.isfinite(scores).all():
        raise ValueError("retrieval_recall got non-finite scores (NaN or inf): check the embeddings.")
    out_of_range = labels[(labels < 0) | (labels >= scores.shape[1])]
    if out_of_range.size:
        raise ValueError(
            f"references must be gallery indices in [0, {scores.shape[1]}), got {out_of_range[:5].tolist()}."
        )
    true_scores = scores[np.arange(len(labels)), labels]
    return (scores >= true_scores[:, None]).sum(axis=1)


__all__ = ["RetrievalRecall"]
