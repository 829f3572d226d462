"""Accuracy against people's picks, read honestly: with its interval, beside the "pick the longer
answer" baseline on the same pairs, and broken down by subset. Shared by `cai judge-eval` (a judge's
labels) and `cai rm eval` (a reward model's scores).

Every item has a score in {0, 0.5, 1}: 1 when the judge / reward model prefers the people's choice,
0.5 for an exact tie, 0 otherwise. Accuracy is their mean, with a Wilson 95 % interval (ties count
as half a success). The length baseline scores the same items by "the longer response (in
characters) wins": a judge that barely beats it has mostly learned length. ``vs_length`` is the
paired difference (accuracy minus the baseline, item by item) with its standard error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cai.stats import Interval, paired_difference, wilson

# Fields of a pairs file that name a subset worth a breakdown, when the caller names none.
BREAKDOWN_FIELDS = ("subset", "source", "category", "data_dir", "domain", "agreement")
MAX_GROUPS = 30  # a field with more distinct values than this is an id, not a subset


def longer_pick(chosen: str, rejected: str) -> float:
    """The length baseline's score on one pair: 1 if the people's choice is the longer response."""
    return 1.0 if len(chosen) > len(rejected) else 0.5 if len(chosen) == len(rejected) else 0.0


def accuracy(scores: Sequence[float]) -> Interval:
    return wilson(float(sum(scores)), len(scores))


@dataclass
class Group:
    field: str
    value: str
    accuracy: Interval
    length_baseline: Interval

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "n": self.accuracy.n,
                "accuracy": self.accuracy.as_dict(), "length_baseline": self.length_baseline.as_dict()}


@dataclass
class AccuracyReport:
    accuracy: Interval
    length_baseline: Interval
    vs_length: Interval
    groups: list[Group] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy.as_dict(), "length_baseline": self.length_baseline.as_dict(),
                "vs_length": self.vs_length.as_dict(), "groups": [g.as_dict() for g in self.groups]}

    def lines(self, what: str = "accuracy") -> list[str]:
        """The report as text: the headline, the baseline, the difference, then one line per group."""
        out = [f"{what} (95% Wilson): {self.accuracy.fmt()}",
               f"longer-answer baseline, same pairs: {self.length_baseline.fmt()}",
               f"{what} - baseline (paired, ± 1.96 se): {self.vs_length.fmt()}"]
        for g in self.groups:
            out.append(f"  {g.field}={g.value}: {what} {g.accuracy.fmt()}, longer answer "
                       f"{g.length_baseline.fmt(digits=3).rsplit(' n=', 1)[0]}")
        return out


def breakdown_fields(metas: Sequence[dict[str, Any]], by: Sequence[str] | None = None) -> list[str]:
    """The fields to break down by: those asked for, else the subset-like fields that vary."""
    if by:
        return list(by)
    out = []
    for name in BREAKDOWN_FIELDS:
        values = {str(m[name]) for m in metas if m.get(name) is not None}
        if 2 <= len(values) <= MAX_GROUPS:
            out.append(name)
    return out


def accuracy_report(scores: Sequence[float], chosen: Sequence[str], rejected: Sequence[str],
                    metas: Sequence[dict[str, Any]] | None = None, by: Sequence[str] | None = None) -> AccuracyReport:
    """Accuracy, the length baseline on the same pairs, their paired difference, and per-group lines."""
    longer = [longer_pick(c, r) for c, r in zip(chosen, rejected, strict=True)]
    if len(longer) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(longer)} pairs")
    report = AccuracyReport(accuracy(scores), accuracy(longer), paired_difference(scores, longer))
    metas = metas or [{} for _ in scores]
    for name in breakdown_fields(metas, by):
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(metas):
            groups.setdefault("(none)" if m.get(name) is None else str(m[name]), []).append(i)
        for value, idx in sorted(groups.items()):
            report.groups.append(Group(name, value, accuracy([scores[i] for i in idx]),
                                       accuracy([longer[i] for i in idx])))
    return report


def interval_details(iv: Interval) -> dict[str, Any]:
    """What an ``evaluations`` row's ``details`` carries about its value's interval."""
    d = iv.as_dict()
    return {"low": d["low"], "high": d["high"], "n": d["n"], "interval_method": d["method"],
            "level": d["level"], "stderr": d["stderr"]}


def evaluation_metrics(report: AccuracyReport, metric: str = "accuracy") -> list[tuple[str, float, dict[str, Any]]]:
    """(metric name, value, interval details) rows for ``evaluations``: the headline, the baseline,
    the difference, and ``<metric>[field=value]`` / ``length_baseline[field=value]`` per group."""
    rows = [(metric, report.accuracy.estimate, interval_details(report.accuracy)),
            ("length_baseline", report.length_baseline.estimate, interval_details(report.length_baseline)),
            (f"{metric}_minus_length_baseline", report.vs_length.estimate, interval_details(report.vs_length))]
    for g in report.groups:
        rows.append((f"{metric}[{g.field}={g.value}]", g.accuracy.estimate, interval_details(g.accuracy)))
        rows.append((f"length_baseline[{g.field}={g.value}]", g.length_baseline.estimate,
                     interval_details(g.length_baseline)))
    return [r for r in rows if r[2]["n"]]
