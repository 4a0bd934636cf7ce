"""What :func:`~register_adapter.find_register_neurons` returns: the register neurons, their scores, the settings and
why, and the outliers before and after the edit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...diagnostics.thresholds import Threshold

#: How neurons are scored at the outlier positions: the paper's mean activation, or the public code's mean of its
#: absolute value.
SCORES = {"mean": "mean activation", "mean_abs": "mean absolute activation"}


@dataclass
class RegisterNeurons:
    """What :func:`~register_adapter.find_register_neurons` found. Iterating it yields the register neurons as ``(block, unit)``
    pairs, best first; pass it to :func:`~register_adapter.add_test_time_registers`.

    Attributes:
        neurons: The register neurons, best first. ``block`` indexes the vision tower's blocks from 0 (the output of
            block ``b`` is ``hidden_states[b + 1]``); ``unit`` indexes the input of the block's MLP output projection.
        scores: (top_layer + 1, MLP width) the score of every candidate ``(block, unit)``.
        score: ``"mean"`` or ``"mean_abs"`` (see :data:`SCORES`).
        outlier_layer: Block whose output the outliers were read at.
        top_layer: Last block whose neurons were candidates.
        top_k: Number of register neurons.
        threshold: The norm threshold at ``outlier_layer`` and how it was chosen.
        num_images: Images seen.
        num_outliers: Outlier patch tokens at ``outlier_layer`` (the positions the scores average over).
        mode: The edit the outlier fractions after it were measured with (``"neuron_max"`` or ``"layer_max"``).
        num_register_tokens: The registers of that edit.
        keep_cls: Whether that edit keeps the neurons' activation on CLS.
        reasons: Why each setting has its value, in words (``threshold``, ``outlier_layer``, ``top_layer``,
            ``top_k``).
        thresholds: The threshold of every block output (``None``: the rule found no outliers there).
        outlier_blocks: The blocks whose output's patch-token norms split into two modes (where the outliers are).
        outlier_fraction_before: Fraction of patch tokens above their block's threshold, per block output.
        outlier_fraction_after: The same with the test-time register edit of ``neurons`` (``mode``,
            ``num_register_tokens``, ``keep_cls``), at the thresholds of the model without it.
        feature_cosine: How close that edit keeps the final tokens to the model's own: the smaller of the mean cosine
            similarity of CLS (where there is one) and of the patch tokens that are not outliers at
            ``outlier_layer``.
    """

    neurons: list[tuple[int, int]]
    scores: torch.Tensor = field(repr=False)
    score: str
    outlier_layer: int
    top_layer: int
    top_k: int
    threshold: Threshold
    num_images: int
    num_outliers: int
    mode: str
    num_register_tokens: int
    keep_cls: bool
    reasons: dict[str, str]
    thresholds: list[float | None] = field(repr=False)
    outlier_blocks: list[int] = field(repr=False)
    outlier_fraction_before: list[float] = field(repr=False)
    outlier_fraction_after: list[float] = field(repr=False)
    feature_cosine: float

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.neurons)

    def __len__(self) -> int:
        return len(self.neurons)

    def ranking(self, count: int | None = None) -> list[tuple[int, int, float]]:
        """The best ``count`` candidates (all by default) as ``(block, unit, score)``, best first."""
        values, order = self.scores.flatten().sort(descending=True, stable=True)
        width = self.scores.shape[1]
        count = len(order) if count is None else count
        return [(int(i) // width, int(i) % width, float(v)) for v, i in zip(values[:count], order[:count])]

    @property
    def source(self) -> str:
        """How the neurons were found, in one sentence (model cards show it)."""
        return (
            f"find_register_neurons on {self.num_images} images: the top {self.top_k} of blocks 0-{self.top_layer} "
            f"by {SCORES[self.score]} at the {self.num_outliers} patch tokens whose norm at the output of block "
            f"{self.outlier_layer} exceeds {self.threshold.value:.4g} ({self.threshold.method} threshold)"
        )

    def to_dict(self, ranking: int = 100) -> dict[str, Any]:
        """A JSON-ready dict: the neurons with their scores, the best ``ranking`` candidates, the settings and why,
        the blocks with outliers, the feature cosine, and the threshold and outlier fraction of every block output
        before and after the edit (scores, norms and the cosine rounded to 4 significant digits)."""

        def number(value: float | None) -> float | None:
            return None if value is None else float(f"{value:.4g}")

        return {
            "neurons": [{"block": b, "unit": u, "score": number(float(self.scores[b, u]))} for b, u in self.neurons],
            "score": self.score,
            "settings": {
                "outlier_layer": self.outlier_layer,
                "top_layer": self.top_layer,
                "top_k": self.top_k,
                "threshold": number(self.threshold.value),
                "threshold_method": self.threshold.method,
                "mode": self.mode,
                "num_register_tokens": self.num_register_tokens,
                "keep_cls": self.keep_cls,
            },
            "reasons": dict(self.reasons),
            "num_images": self.num_images,
            "num_outliers": self.num_outliers,
            "outlier_blocks": list(self.outlier_blocks),
            "feature_cosine": number(self.feature_cosine),
            "ranking": [{"block": b, "unit": u, "score": number(v)} for b, u, v in self.ranking(ranking)],
            "blocks": [
                {
                    "block": index,
                    "threshold": number(threshold),
                    "outlier_fraction_before": number(before),
                    "outlier_fraction_after": number(after),
                }
                for index, (threshold, before, after) in enumerate(
                    zip(self.thresholds, self.outlier_fraction_before, self.outlier_fraction_after)
                )
            ],
        }

    def to_json(self, path: str | Path | None = None, ranking: int = 100) -> str:
        """:meth:`to_dict` as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(ranking), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text
