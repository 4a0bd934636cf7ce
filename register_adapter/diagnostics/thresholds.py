"""Norm thresholds that separate artifact tokens from the others: fixed, mean + k std, or a bimodal split."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import InvalidConfigError

_SIGMA_RULE = re.compile(r"^mean\+(\d+(?:\.\d+)?)std$")
#: A second mode of the log-norm histogram counts as artifacts only this far above the median norm.
MIN_ARTIFACT_RATIO = 2.0


@dataclass(frozen=True)
class Threshold:
    """A norm threshold and how it was chosen.

    Attributes:
        value: Tokens with a larger norm are outliers; ``None`` when the rule found no outliers to separate.
        method: ``"fixed"``, ``"mean+<k>std"`` or ``"bimodal"``.
        note: One sentence on the choice, for reports.
    """

    value: float | None
    method: str
    note: str


def bimodal_threshold(norms: np.ndarray, min_ratio: float = MIN_ARTIFACT_RATIO) -> Threshold:
    """Split token norms at the valley between the main mode and a second, high-norm mode.

    The log norms are smoothed into a density (histogram + Gaussian kernel, bandwidth a third of their robust spread,
    at least 0.05). A second mode counts when it peaks at least ``min_ratio`` x the median norm and the density
    between it and the main mode drops below half its height; the threshold is the lowest point of that valley. Unlike
    Otsu's method, which prefers two classes of similar size, this finds a 2 % minority as well as a 20 % one, and
    returns no threshold when the distribution has one mode (a clean model).

    Args:
        norms: (n,) token norms.
        min_ratio: How far above the median norm the second mode must peak.
    """
    x = np.log(np.maximum(np.asarray(norms, dtype=np.float64).ravel(), 1e-12))  # (n,)
    return log_bimodal_threshold(x, None, min_ratio)


def _median(x: np.ndarray, weights: np.ndarray | None) -> float:
    if weights is None:
        return float(np.median(x))
    order = np.argsort(x, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(x[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def log_bimodal_threshold(
    x: np.ndarray, weights: np.ndarray | None = None, min_ratio: float = MIN_ARTIFACT_RATIO
) -> Threshold:
    """:func:`bimodal_threshold` on log norms ``x`` (n,), each counted ``weights`` (n,) times when given: the
    centres and counts of a fine histogram of log norms give the split of the norms it counts (see
    :class:`~register_adapter.diagnostics.norm_stats.NormStats`)."""
    median = _median(x, weights)
    spread = 1.4826 * _median(np.abs(x - median), weights)
    bandwidth = max(spread / 3, 0.05)
    low, high = x.min() - 3 * bandwidth, x.max() + 3 * bandwidth
    bins = 512
    counts, edges = np.histogram(x, bins=bins, range=(low, high), weights=weights)
    centers = (edges[:-1] + edges[1:]) / 2  # (bins,)
    density = ndimage.gaussian_filter1d(counts.astype(np.float64), bandwidth / (edges[1] - edges[0]))
    main = int(np.argmax(density))
    peaks = [
        i
        for i in range(main + 1, bins - 1)
        if density[i] >= density[i - 1] and density[i] > density[i + 1] and centers[i] >= median + math.log(min_ratio)
    ]
    best = None
    for peak in peaks:
        valley = main + int(np.argmin(density[main : peak + 1]))
        if density[valley] < 0.5 * density[peak] and (best is None or density[peak] > density[best[0]]):
            best = (peak, valley)
    if best is None:
        return Threshold(None, "bimodal", "one mode: no token norm stands apart from the others")
    peak, valley = best
    value = float(math.exp(centers[valley]))
    ratio = math.exp(centers[peak] - median)
    return Threshold(
        value, "bimodal", f"valley of the log-norm histogram below a second mode at {ratio:.1f}x the median norm"
    )


def check_threshold(rule: Any) -> float | str:
    """Validate a threshold rule before any norm is measured; returns it with a number as a ``float``.

    Args:
        rule: A positive, finite real number (``int``, ``float``, numpy scalars and 0-d arrays or tensors are all
            accepted), ``"auto"``, ``"bimodal"`` or ``"mean+<k>std"``.

    Raises:
        InvalidConfigError: anything else, with the value received.
    """
    if getattr(rule, "ndim", None) == 0 and hasattr(rule, "item"):  # 0-d numpy array or torch tensor
        rule = rule.item()
    if isinstance(rule, numbers.Real) and not isinstance(rule, bool):
        value = float(rule)
        if not (math.isfinite(value) and value > 0):
            raise InvalidConfigError(f"A fixed threshold must be a positive, finite number; got {value:g}.")
        return value
    if isinstance(rule, str) and (rule in ("auto", "bimodal") or _SIGMA_RULE.match(rule)):
        return rule
    raise InvalidConfigError(
        f"threshold must be a positive number, 'auto', 'bimodal' or 'mean+<k>std' (e.g. 'mean+3std'); got {rule!r}."
    )


def resolve_threshold(rule: Any, norms: np.ndarray) -> Threshold:
    """Apply a threshold rule to the patch-token norms (n,) of one layer.

    Args:
        rule: A positive number (fixed; Darcet et al. use 150 for DINOv2 ViT-g and ViT-L), ``"auto"`` (=
            ``"bimodal"``, see :func:`bimodal_threshold`), or ``"mean+<k>std"`` (e.g. ``"mean+3std"``, the rule of
            Jiang et al., https://arxiv.org/abs/2506.08010). Checked by :func:`check_threshold`.
        norms: Token norms of one layer.
    """
    rule = check_threshold(rule)
    if isinstance(rule, float):
        return Threshold(rule, "fixed", f"fixed threshold {rule:g}")
    if rule in ("auto", "bimodal"):
        return bimodal_threshold(norms)
    return sigma_threshold(rule, float(np.mean(norms)), float(np.std(norms)))


def sigma_threshold(rule: str, mean: float, std: float) -> Threshold:
    """The ``"mean+<k>std"`` threshold of norms with this ``mean`` and (population) ``std``."""
    match = _SIGMA_RULE.match(rule)
    k = float(match.group(1))
    return Threshold(
        mean + k * std, f"mean+{match.group(1)}std", f"mean + {k:g} standard deviations of the patch-token norms"
    )
