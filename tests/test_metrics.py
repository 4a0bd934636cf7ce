"""The metrics ship as ``evaluate`` modules that load offline from their local paths and agree with the library's own
functions."""

import re

import evaluate
import numpy as np
import pytest

from register_adapter.errors import InvalidConfigError
from register_adapter.metrics import MODULES, ArtifactNorms, CorLoc, TopKAccuracy, corloc, module_path
from register_adapter.training.metrics import ClassificationMetrics


@pytest.mark.parametrize(
    ("name", "cls"), [("accuracy", TopKAccuracy), ("corloc", CorLoc), ("artifacts", ArtifactNorms)]
)
def test_every_module_loads_offline_from_its_path(name, cls):
    assert name in MODULES
    module = evaluate.load(module_path(name))
    assert type(module).__name__ == cls.__name__


def test_top_k_accuracy_numbers():
    ranked = [[3, 1, 2, 0, 4, 5], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    result = evaluate.load(module_path("accuracy")).compute(predictions=ranked, references=[3, 4, 9], k=5)
    assert result == {"accuracy": pytest.approx(1 / 3), "top5_accuracy": pytest.approx(2 / 3)}
    assert TopKAccuracy().compute(predictions=[1, 2, 2], references=[1, 2, 3], k=1) == {
        "accuracy": pytest.approx(2 / 3)
    }


def test_top_k_accuracy_is_reported_only_where_the_predictions_rank_k_classes():
    accuracy = evaluate.load(module_path("accuracy"))
    assert accuracy.compute(predictions=[3, 0], references=[3, 2]) == {"accuracy": 0.5}  # one class id per image
    assert accuracy.compute(predictions=[[3, 1, 2], [0, 1, 2]], references=[3, 2]) == {"accuracy": 0.5}
    message = (
        "top-5 accuracy needs at least 5 ranked class ids per image; the predictions hold 3. Pass k=3 or less, or "
        "more ranked ids (best first)."
    )
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        accuracy.compute(predictions=[[3, 1, 2], [0, 1, 2]], references=[3, 2], k=5)


def test_trainer_metrics_from_ranked_ids_or_logits():
    from transformers import EvalPrediction

    logits = np.array([[0.1, 0.9, 0.0, 0, 0, 0, 0], [0.8, 0.1, 0.05, 0, 0, 0, 0.5]])  # (2, 7): labels 1, 6
    labels = np.array([1, 6])
    from_logits = ClassificationMetrics(7)(EvalPrediction(predictions=logits, label_ids=labels))
    assert from_logits == {"accuracy": 0.5, "top5_accuracy": 1.0}
    three = ClassificationMetrics(3)(EvalPrediction(predictions=np.array([[2, 0, 1], [0, 1, 2]]), label_ids=[2, 1]))
    assert three == {"accuracy": 0.5}


def test_corloc_module_equals_the_function():
    predicted = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10)]
    truth = [[(0, 0, 10, 9)], [(20, 20, 30, 30), (0, 0, 14, 10)], [(5, 0, 15, 10)]]
    result = evaluate.load(module_path("corloc")).compute(predictions=predicted, references=truth)
    assert result == {"corloc": corloc(predicted, truth)} == {"corloc": pytest.approx(2 / 3)}
    assert CorLoc().compute(predictions=predicted, references=truth, iou_threshold=0.3) == {"corloc": 1.0}


def test_artifact_norms_numbers():
    norms = [[1.0, 2.0, 3.0, 40.0], [2.0, 2.0, 2.0, 2.0]]  # median 2, max 40
    result = evaluate.load(module_path("artifacts")).compute(norms=norms, threshold=10.0)
    assert result == {"outlier_fraction": 0.125, "norm_ratio": 20.0}
    assert ArtifactNorms().compute(norms=norms) == {"outlier_fraction": 0.0, "norm_ratio": 20.0}
