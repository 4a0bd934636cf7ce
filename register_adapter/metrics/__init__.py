"""Metrics as 🤗 ``evaluate`` modules that work offline: classification accuracy and top-k accuracy, CorLoc for object
discovery, and the artifact metrics (outlier fraction, norm ratio).

``evaluate.load("accuracy")`` fetches its script from the Hub; these modules ship with the package. Use the classes
directly, or load a module by its local path as ``evaluate`` loads any script:

>>> import evaluate
>>> from register_adapter.metrics import module_path
>>> corloc = evaluate.load(module_path("corloc"))
>>> corloc.compute(predictions=[[10, 10, 30, 30]], references=[[[12, 10, 30, 32]]])
{'corloc': 1.0}

Each module's file defines exactly one ``evaluate`` module, as ``evaluate.load`` expects.
"""

from __future__ import annotations

from pathlib import Path

from .accuracy import TopKAccuracy, top_k_accuracy
from .artifacts import ArtifactNorms, artifact_metrics
from .corloc import CorLoc, box_iou, corloc

#: name -> the file ``evaluate.load`` reads.
MODULES = ("accuracy", "artifacts", "corloc")


def module_path(name: str) -> str:
    """The local path of the metric module ``name`` (one of :data:`MODULES`), for ``evaluate.load``."""
    if name not in MODULES:
        from ..errors import InvalidConfigError

        raise InvalidConfigError(f"Unknown metric module {name!r}. Available: {', '.join(MODULES)}.")
    return str(Path(__file__).with_name(f"{name}.py"))


__all__ = [
    "MODULES",
    "ArtifactNorms",
    "CorLoc",
    "TopKAccuracy",
    "artifact_metrics",
    "box_iou",
    "corloc",
    "module_path",
    "top_k_accuracy",
]
