"""Summary statistics of execution times: mean, standard deviation, 95 % confidence interval of
the mean (Student's t, as the samples are few: 7 repetitions in the thesis), Welch's t-test and
the relative change of a "with migration" variant against its "no migration" twin."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan when n < 2
    half_width: float  # of the 95 % CI of the mean; inf when n < 2

    @property
    def ci_low(self) -> float:
        return self.mean - self.half_width

    @property
    def ci_high(self) -> float:
        return self.mean + self.half_width


def summarize(samples: Sequence[float]) -> Summary:
    values = np.asarray(samples, dtype=float)
    n = len(values)
    if n == 0:
        raise ValueError("no samples")
    mean = float(values.mean())
    if n < 2:
        return Summary(n, mean, math.nan, math.inf)
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * std / math.sqrt(n))
    return Summary(n, mean, std, half)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); nan when either side has n < 2."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def relative_change(with_migration: Sequence[float], without: Sequence[float]) -> float:
    """(mean with - mean without) / mean without: -0.39 is the thesis' "39 % shorter" (Exp. 1)."""
    base = float(np.mean(without))
    return (float(np.mean(with_migration)) - base) / base
