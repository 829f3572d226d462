"""Intervals for the figures the project reports: every quality number comes with one.

Three estimators, all returning an :class:`Interval` (estimate, low, high, n, method):

* :func:`wilson`: a proportion (accuracy, a rate) from successes out of ``n``. Better than the
  normal approximation near 0 and 1 and at small ``n``; successes may be fractional (a tie
  counted as half a success), which the formula accepts as the observed proportion.
* :func:`bootstrap_mean`: the percentile bootstrap of a mean (accuracy as the mean of 0/1/0.5
  scores, a mean reward). Seeded and vectorised: resample indices as one matrix per chunk.
* :func:`mean_interval` / :func:`paired_difference`: mean ± z · standard error, for paired
  differences (policy minus baseline on the same prompts), where the normal approximation is
  what people expect to read and the standard error itself is worth reporting.

The level is 95 % unless told otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

LEVEL = 0.95
# Resampled means held in memory at once: chunks of (resamples, n) index matrices stay this small.
_MAX_CELLS = 4_000_000


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int
    method: str                    # wilson | bootstrap | stderr
    level: float = LEVEL
    stderr: float | None = None    # set by the standard-error methods

    def fmt(self, digits: int = 3, method: bool = False) -> str:
        """``0.612 [0.578, 0.645] n=776``; ``n/a (n=0)`` when there is nothing to estimate."""
        if self.n == 0 or math.isnan(self.estimate):
            return f"n/a (n={self.n})"
        out = f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] n={self.n}"
        return f"{out} {self.method}" if method else out

    def as_dict(self) -> dict[str, Any]:
        """For ``details`` JSON: NaN becomes None so the JSON stays valid."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def z_value(level: float = LEVEL) -> float:
    """Two-sided normal quantile: 1.959964 for 95 %."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf((1 + level) / 2)


def _empty(method: str, level: float) -> Interval:
    nan = float("nan")
    return Interval(nan, nan, nan, 0, method, level)


def wilson(successes: float, n: int, level: float = LEVEL) -> Interval:
    """Wilson score interval for the proportion ``successes / n``."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return _empty("wilson", level)
    z = z_value(level)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    # At p = 0 (or 1) the bound is exactly 0 (or 1); rounding would leave 1e-17 off it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, n, "wilson", level)


def bootstrap_mean(values: Sequence[float] | np.ndarray, level: float = LEVEL, resamples: int = 2000,
                   seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (same seed, same interval)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError("values must be one-dimensional")
    n = len(x)
    if n == 0:
        return _empty("bootstrap", level)
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CELLS // n)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(float(x.mean()), float(low), float(high), n, "bootstrap", level)


def mean_interval(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> Interval:
    """Mean ± z · standard error (sample standard deviation / sqrt(n)). One value: no spread known,
    so the interval is the point and ``stderr`` is None."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return _empty("stderr", level)
    m = float(x.mean())
    if n == 1:
        return Interval(m, m, m, 1, "stderr", level, None)
    se = float(x.std(ddof=1) / math.sqrt(n))
    z = z_value(level)
    return Interval(m, m - z * se, m + z * se, n, "stderr", level, se)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      level: float = LEVEL) -> Interval:
    """Mean of ``a[i] - b[i]`` with its standard error: both measured on the same items, so the
    items' own spread cancels (much tighter than two independent intervals)."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired values need the same length, got {len(xa)} and {len(xb)}")
    return mean_interval(xa - xb, level)
