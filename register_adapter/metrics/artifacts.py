"""Artifact metrics of patch-token norms, as an ``evaluate`` measurement: the fraction of outlier tokens and how far the
largest norm stands above the typical one (Darcet et al., https://arxiv.org/abs/2309.16588: artifacts are about 10x
the other norms, on about 2 % of the patches).

>>> ArtifactNorms().compute(norms=[[1.0, 1.0, 1.0, 12.0], [1.0, 2.0, 1.0, 1.0]], threshold=10.0)
{'outlier_fraction': 0.125, 'norm_ratio': 12.0}
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Artifact metrics of patch-token norms (measured on the residual stream, e.g. by
register_adapter.find_artifacts): outlier_fraction, the fraction of tokens whose norm exceeds the threshold, and
norm_ratio, the largest norm over the median norm."""

_INPUTS = """
Args:
    norms: per image, the patch-token norms at one layer (a list of floats).
    threshold: tokens with a larger norm are outliers; None counts none.
Returns:
    outlier_fraction: a float in [0, 1].
    norm_ratio: max norm / median norm over all tokens.
"""


def artifact_metrics(norms: np.ndarray, threshold: float | None) -> dict[str, float]:
    """``outlier_fraction`` (norms above ``threshold``; ``None`` counts none) and ``norm_ratio`` (max / median) of
    token norms of any shape."""
    norms = np.asarray(norms, dtype=np.float64).ravel()
    outliers = float((norms > threshold).mean()) if threshold is not None else 0.0
    median = float(np.median(norms))
    return {"outlier_fraction": outliers, "norm_ratio": float(norms.max() / median) if median > 0 else float("inf")}


class ArtifactNorms(evaluate.Measurement):
    """Outlier fraction and norm ratio of patch-token norms."""

    def _info(self) -> evaluate.MeasurementInfo:
        return evaluate.MeasurementInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"norms": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, norms: Sequence[Sequence[float]], threshold: float | None = None) -> dict[str, float]:
        return artifact_metrics(np.concatenate([np.asarray(n, dtype=np.float64) for n in norms]), threshold)
