"""CorLoc, the metric of single-object discovery (LOST, Siméoni et al., https://arxiv.org/abs/2109.14279), as an
``evaluate`` metric: the fraction of images whose predicted box overlaps some ground-truth box with IoU >= 0.5.

>>> corloc([(10, 10, 30, 30)], [[(12, 10, 30, 32)]])
1.0
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Correct localisation: the fraction of images whose predicted box (x0, y0, x1, y1) overlaps some
ground-truth box of that image with IoU >= iou_threshold (0.5 in LOST and in Darcet et al.)."""

_INPUTS = """
Args:
    predictions: one box (x0, y0, x1, y1) per image.
    references: per image, a list of ground-truth boxes (any of them counts).
    iou_threshold: the smallest IoU of a correct localisation (default 0.5).
Returns:
    corloc: a float in [0, 1].
"""


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def corloc(
    predicted: Sequence[Sequence[float]], ground_truth: Sequence[Sequence[Sequence[float]]], iou_threshold: float = 0.5
) -> float:
    """Correct localisation: the fraction of images whose predicted box overlaps *some* ground-truth box of that
    image with IoU >= ``iou_threshold``.

    Args:
        predicted: One box per image.
        ground_truth: Per image, a list of boxes (any of them counts).
        iou_threshold: Minimum IoU of a correct localisation.

    Raises:
        InvalidConfigError: not one prediction per image, no image, or boxes that are not 4 numbers (per image, a
            *list* of ground-truth boxes).
    """
    from register_adapter.errors import InvalidConfigError

    if len(predicted) != len(ground_truth):
        raise InvalidConfigError(
            f"corloc needs one predicted box per image: got {len(predicted)} predictions for {len(ground_truth)} "
            "images."
        )
    if len(predicted) == 0:
        raise InvalidConfigError("corloc needs at least one image.")
    for index, (box, truths) in enumerate(zip(predicted, ground_truth)):
        if not _is_box(box):
            raise InvalidConfigError(
                f"corloc: prediction {index} is {box!r}, not a box (x0, y0, x1, y1): give one box per image."
            )
        if isinstance(truths, (str, bytes)) or not all(_is_box(truth) for truth in truths) or _is_box(truths):
            raise InvalidConfigError(
                f"corloc: ground truth {index} is {truths!r}, not a list of boxes (x0, y0, x1, y1): give each image "
                "a list of its boxes, e.g. [[box]] for one image with one box."
            )
    hits = [any(box_iou(p, g) >= iou_threshold for g in truths) for p, truths in zip(predicted, ground_truth)]
    return float(np.mean(hits))


def _is_box(value: object) -> bool:
    return (
        isinstance(value, Sequence | np.ndarray)
        and len(value) == 4
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    )


class CorLoc(evaluate.Metric):
    """CorLoc of one predicted box per image against a list of ground-truth boxes per image."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64"), length=4),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=4)),
                }
            ),
        )

    def _compute(self, predictions: Sequence, references: Sequence, iou_threshold: float = 0.5) -> dict[str, float]:
        return {"corloc": corloc(predictions, references, iou_threshold)}
