"""Token norms summarised as they stream past: enough for every threshold rule, in memory that does not grow with the
number of images.

A :class:`NormStats` keeps the count, mean and spread of the norms it saw (exact, merged batch by batch) and a
histogram of their logarithm in bins :data:`LOG_BIN` wide (0.024 % of the norm), which stands in for the norms
themselves: the bimodal split and the share of tokens above a threshold come from it.

>>> import numpy as np
>>> stats = NormStats()
>>> for batch in np.split(np.r_[np.full(980, 10.0), np.full(20, 200.0)], 4):
...     stats.add(batch)
>>> stats.count, round(stats.threshold("mean+3std").value, 2)
(1000, 93.6)
>>> chosen = stats.threshold("auto")
>>> round(chosen.value), stats.fraction_above(chosen.value)
(12, 0.02)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .thresholds import Threshold, check_threshold, log_bimodal_threshold, sigma_threshold

#: Width of the histogram bins, in log norm: a norm is known to within a factor exp(LOG_BIN) = 1.00024.
LOG_BIN = 2.0**-12


@dataclass
class NormStats:
    """Count, mean and spread of token norms, and a histogram of their logarithm, updated one batch at a time.

    Attributes:
        count: Norms seen.
        mean: Their mean.
        m2: Sum of squared deviations from the mean (Chan et al.'s parallel update: exact for any batching).
        offset: Index, in units of :data:`LOG_BIN`, of the first histogram bin.
        counts: Norms per bin, from ``offset`` on.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    offset: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)

    def add(self, norms: Any) -> None:
        """Count the norms (any shape)."""
        x = np.asarray(norms, dtype=np.float64).ravel()
        if not x.size:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + x.size
        delta = mean - self.mean
        self.m2 += m2 + delta**2 * self.count * x.size / total
        self.mean += delta * x.size / total
        self.count = total
        bins = np.floor(np.log(np.maximum(x, 1e-12)) / LOG_BIN).astype(np.int64)
        low = int(bins.min()) if not self.counts.size else min(int(bins.min()), self.offset)
        high = int(bins.max()) if not self.counts.size else max(int(bins.max()), self.offset + len(self.counts) - 1)
        counts = np.zeros(high - low + 1, dtype=np.int64)
        counts[self.offset - low : self.offset - low + len(self.counts)] = self.counts
        counts += np.bincount(bins - low, minlength=len(counts))
        self.offset, self.counts = low, counts

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def _centers(self) -> tuple[np.ndarray, np.ndarray]:
        """(log-norm centre, count) of the bins that hold norms."""
        filled = np.flatnonzero(self.counts)
        return (self.offset + filled + 0.5) * LOG_BIN, self.counts[filled]

    def threshold(self, rule: Any) -> Threshold:
        """The threshold of ``rule`` (see :func:`~register_adapter.diagnostics.resolve_threshold`) for these norms:
        a fixed number as it is, ``"mean+<k>std"`` exactly, ``"auto"`` / ``"bimodal"`` from the histogram."""
        rule = check_threshold(rule)
        if isinstance(rule, float):
            return Threshold(rule, "fixed", f"fixed threshold {rule:g}")
        if rule in ("auto", "bimodal"):
            return log_bimodal_threshold(*self._centers())
        return sigma_threshold(rule, self.mean, self.std)

    def fraction_above(self, value: float | None) -> float:
        """Share of the norms above ``value`` (0 for ``None``), to within the norms in the bin that holds it."""
        if value is None or not self.count:
            return 0.0
        centers, counts = self._centers()
        return float(counts[centers > math.log(value)].sum() / self.count)
