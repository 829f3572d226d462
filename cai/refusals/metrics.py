"""Precision, recall and F1 of a refusal classifier against human labels, with 95 % intervals.

Precision and recall are proportions (of the predicted refusals, of the true refusals), so they get
Wilson intervals; F1 is not a proportion of anything, so it gets a percentile bootstrap over the
labelled rows (resampling rows, recomputing F1; seeded and vectorised; resamples without any
refusal, where F1 is undefined, are left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cai.stats import LEVEL, Interval, wilson


@dataclass(frozen=True)
class RefusalMetrics:
    n: int
    positives: int  # human-labelled refusals
    tp: int
    fp: int
    fn: int
    tn: int
    precision: Interval
    recall: Interval
    f1: Interval
    accuracy: Interval

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "positives": self.positives, "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
                **{k: getattr(self, k).as_dict() for k in ("precision", "recall", "f1", "accuracy")}}


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn); NaN where a resample holds no refusal, predicted or true (undefined)."""
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.full_like(denom, np.nan, dtype=float), where=denom > 0)


def f1_bootstrap(y_true: Sequence[bool], y_pred: Sequence[bool], *, level: float = LEVEL, resamples: int = 2000,
                 seed: int = 0) -> Interval:
    """F1 with a percentile-bootstrap interval over rows (same seed, same interval)."""
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    n = len(t)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, 0, "bootstrap", level)
    cell = (t & p).astype(np.int8), (~t & p).astype(np.int8), (t & ~p).astype(np.int8)
    point = float(_f1(*(np.array([c.sum()], dtype=float) for c in cell))[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)
    vals = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        vals[start:stop] = _f1(*(c[idx].sum(axis=1).astype(float) for c in cell))
    alpha = (1 - level) / 2
    low, high = np.nanquantile(vals, [alpha, 1 - alpha]) if not np.isnan(vals).all() else (point, point)
    return Interval(point, float(low), float(high), n, "bootstrap", level)


def refusal_metrics(y_true: Sequence[bool], y_pred: Sequence[bool], *, level: float = LEVEL,
                    resamples: int = 2000, seed: int = 0) -> RefusalMetrics:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    pairs = list(zip(map(bool, y_true), map(bool, y_pred), strict=True))
    tp = sum(t and p for t, p in pairs)
    fp = sum(p and not t for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)
    tn = len(pairs) - tp - fp - fn
    return RefusalMetrics(
        n=len(pairs), positives=tp + fn, tp=tp, fp=fp, fn=fn, tn=tn,
        precision=wilson(tp, tp + fp, level), recall=wilson(tp, tp + fn, level),
        f1=f1_bootstrap(y_true, y_pred, level=level, resamples=resamples, seed=seed),
        accuracy=wilson(tp + tn, len(pairs), level))
