"""`cai refusals eval`: measure refusal classifiers on human-labelled replies.

The file is JSONL of ``{prompt, completion, refusal}`` (the shape of XSTest's labelled completions);
optional ``type`` and ``model`` fields give per-group breakdowns. The per-``model`` breakdown is the
generalisation check: the rules were written from refusal styles in general, so their figure on one
model's replies is not fitted to that model, and a classifier that works only for one model's style
shows up as one bad row.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.refusals import get_classifier
from cai.refusals.metrics import RefusalMetrics, refusal_metrics

GROUP_FIELDS = ("model", "type")


@dataclass
class LabelledReply:
    line: int
    prompt: str
    completion: str
    refusal: bool
    groups: dict[str, str] = field(default_factory=dict)


def load_labelled_replies(path: str | Path, *, limit: int | None = None, seed: int = 0) -> list[LabelledReply]:
    """Rows of the file; bad rows raise ``ValueError`` naming file, line and field. With ``limit``, a
    seeded random sample of that many rows (the file's order is often grouped by model or type)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows: list[LabelledReply] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object with prompt, completion, refusal")
            for key, kind in (("prompt", str), ("completion", str), ("refusal", bool)):
                if not isinstance(obj.get(key), kind):
                    got = "missing" if key not in obj else f"a {type(obj[key]).__name__}"
                    raise ValueError(f"{path}:{i}: field {key!r} must be a {'boolean' if kind is bool else 'string'}"
                                     f" (got {got}); each row needs prompt, completion and refusal (true/false)")
            rows.append(LabelledReply(i, obj["prompt"], obj["completion"], obj["refusal"],
                                      {g: str(obj[g]) for g in GROUP_FIELDS if obj.get(g) is not None}))
    if not rows:
        raise ValueError(f"{path}: no rows")
    if limit is not None and limit < len(rows):
        rows = sorted(random.Random(seed).sample(rows, limit), key=lambda r: r.line)
    return rows


@dataclass
class ClassifierReport:
    name: str
    overall: RefusalMetrics
    groups: dict[str, dict[str, RefusalMetrics]]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    predictions: list[float] = field(default_factory=list)


def evaluate_classifiers(rows: list[LabelledReply], names: list[str], *, seed: int = 0,
                         options: dict[str, Any] | None = None) -> list[ClassifierReport]:
    reports = []
    prompts = [r.prompt for r in rows]
    replies = [r.completion for r in rows]
    truth = [r.refusal for r in rows]
    for name in names:
        clf = get_classifier(name, **(options or {})) if name in ("judge", "combined") else get_classifier(name)
        started = time.time()
        scores = clf.scores(prompts, replies)
        seconds = time.time() - started
        pred = [s >= 0.5 for s in scores]
        groups: dict[str, dict[str, RefusalMetrics]] = {}
        for g in GROUP_FIELDS:
            idx: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(rows):
                if g in r.groups:
                    idx[r.groups[g]].append(i)
            if idx:
                groups[g] = {v: refusal_metrics([truth[i] for i in ix], [pred[i] for i in ix], seed=seed)
                             for v, ix in sorted(idx.items())}
        reports.append(ClassifierReport(name, refusal_metrics(truth, pred, seed=seed), groups, seconds,
                                        dict(getattr(clf, "info", {}) or {}), scores))
    return reports
