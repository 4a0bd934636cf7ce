"""Classification metrics for the ``Trainer``, through the offline ``evaluate`` module
:class:`register_adapter.metrics.TopKAccuracy` (``evaluate.load("accuracy")`` needs the Hub).

Logits never leave the device in full: :func:`top_k_predictions` (the ``preprocess_logits_for_metrics`` hook)
keeps the ``k`` best class ids per image, so evaluation memory grows with ``k``, not with the number of classes.

>>> import numpy as np
>>> from transformers import EvalPrediction
>>> compute = ClassificationMetrics(num_labels=10)
>>> ranked = np.array([[3, 1, 2, 0, 4], [0, 1, 2, 3, 4]])  # (N, k) class ids, best first
>>> compute(EvalPrediction(predictions=ranked, label_ids=np.array([3, 4])))
{'accuracy': 0.5, 'top5_accuracy': 1.0}
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import EvalPrediction

from ..metrics.accuracy import TopKAccuracy

TOP_K = 5


def top_k_predictions(
    logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, k: int = TOP_K
) -> torch.Tensor:
    """The ids of the ``k`` highest logits per row, best first: ``(N, C)`` logits to ``(N, min(k, C))`` ids.

    Models that return several logits (e.g. DeiT with a distillation head) pass a tuple; the first entry counts.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


def metric_names(num_labels: int) -> list[str]:
    """The names of the metrics that evaluation reports for ``num_labels`` classes (the ``Trainer`` adds ``eval_``).

    >>> metric_names(3)
    ['loss', 'accuracy']
    """
    return ["loss", "accuracy"] + ([f"top{TOP_K}_accuracy"] if num_labels > TOP_K else [])


class ClassificationMetrics:
    """``compute_metrics`` for the ``Trainer``: ``accuracy``, plus ``top5_accuracy`` with more than five classes.

    Expects predictions from :func:`top_k_predictions` (ranked class ids); plain ``(N, C)`` logits work as well.

    Args:
        num_labels: the number of classes of the classifier head.
    """

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        # In memory: no cache files that several processes of a distributed run would share.
        self.metric = TopKAccuracy(keep_in_memory=True)

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        ranked = prediction.predictions
        if isinstance(ranked, (tuple, list)):
            ranked = ranked[0]
        ranked = np.asarray(ranked)
        labels = np.asarray(prediction.label_ids).reshape(-1)
        if np.issubdtype(ranked.dtype, np.floating):  # raw logits
            ranked = np.argsort(-ranked, axis=-1, kind="stable")[:, :TOP_K]
        k = TOP_K if self.num_labels > TOP_K else 1
        return self.metric.compute(predictions=ranked[:, :TOP_K], references=labels, k=k)
