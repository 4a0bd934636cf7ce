"""Accuracy and top-k accuracy of ranked class predictions, as an ``evaluate`` metric.

>>> TopKAccuracy().compute(predictions=[[3, 1, 2], [0, 1, 2]], references=[3, 2], k=2)
{'accuracy': 0.5, 'top2_accuracy': 0.5}
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Accuracy (the first-ranked class is the label) and top-k accuracy (the label is among the k first
ranked classes). Predictions are class ids ranked best first, one row per image, or a single class id per image."""

_INPUTS = """
Args:
    predictions: per image, class ids ranked best first (a list of ints), or one class id.
    references: per image, the label (an int).
    k: the rank of the top-k accuracy; 1 reports accuracy alone. Default: 5 when the predictions rank at least 5
        classes, else 1.
Returns:
    accuracy, and ``top{k}_accuracy`` for k > 1.
"""
DEFAULT_K = 5


def top_k_accuracy(ranked: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the first ``k`` ids of ``ranked`` (``(N, >=k)``, best first); ``nan``
    for no rows."""
    if len(labels) == 0:
        return float("nan")
    hits = (np.asarray(ranked)[:, :k] == np.asarray(labels)[:, None]).any(axis=1)
    return float(hits.mean())


class TopKAccuracy(evaluate.Metric):
    """Accuracy and top-k accuracy of ranked class ids."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions: Sequence, references: Sequence[int], k: int | None = None) -> dict[str, float]:
        ranked = np.asarray(predictions, dtype=np.int64)
        ranked = ranked[:, None] if ranked.ndim == 1 else ranked  # (N, r)
        labels = np.asarray(references, dtype=np.int64)
        if k is None:
            k = DEFAULT_K if ranked.shape[1] >= DEFAULT_K else 1
        if k > ranked.shape[1]:
            from register_adapter.errors import InvalidConfigError

            raise InvalidConfigError(
                f"top-{k} accuracy needs at least {k} ranked class ids per image; the predictions hold "
                f"{ranked.shape[1]}. Pass k={ranked.shape[1]} or less, or more ranked ids (best first)."
            )
        results = {"accuracy": top_k_accuracy(ranked, labels, 1)}
        if k > 1:
            results[f"top{k}_accuracy"] = top_k_accuracy(ranked, labels, k)
        return results
