"""How good is a judge? Run a judge spec on human-labelled pairs and measure it.

Input: JSONL, one ``{"prompt": text or messages, "chosen": text, "rejected": text}`` per line
(other fields are kept; ``id`` names the item). For each item a seeded coin decides whether the
chosen response is shown as A or as B, so that a judge that always answers "A" scores 50% on the
single-ordering numbers and calibration is measured on both outcomes.

Metrics (over valid items unless said otherwise):

* ``agreement``: share of items where the final label prefers the human's choice (a label of
  exactly 0.5 counts half); ``agreement_first_ordering`` uses only the ordering with A shown
  first (what a judge asked once would say), ``agreement_swapped_ordering`` only the other one;
  ``agreement_all_items`` counts invalid items as a coin flip (0.5);
* ``position_consistency``: share of items where both orderings prefer the same response;
  ``first_position_rate``: share of answers (two per item) that pick whichever response is shown
  first (0.5 = no position bias);
* ``brier``: mean (P(A better) - [A is the human's choice])^2; ``ece``: expected calibration error
  over 10 equal-width bins of P(A better); both also for the first ordering alone;
* ``invalid_rate`` and the reasons; per-principle agreement when a constitution is used;
* intervals (95 %, Wilson) on the agreement rates, and ``length_baseline``: the agreement of "pick
  the longer response" on the same (valid) pairs, with ``agreement_minus_length_baseline``, the
  paired difference; per-subset agreement for subset-like fields of the file (``subset``,
  ``agreement``, ...; see ``cai.pair_accuracy``) and per-principle agreement, each with its interval.

Results go to the ``evaluations`` table (kind 'judge_quality', one row per metric, subject = the
judge spec hash; ``details`` holds ``low``/``high``/``n`` where the metric has an interval), a
reliability plot PNG and a per-item JSONL in ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.engines.base import Engine
from cai.judge import Judge, PairInput, PrincipleRef
from cai.judge_spec import JudgeSpec
from cai.pair_accuracy import (
    AccuracyReport,
    accuracy_report,
    evaluation_metrics,
    interval_details,
    longer_pick,
)
from cai.stats import wilson
from cai.store import Store, content_hash, now
from cai.yamlio import Problem, SpecError


@dataclass
class LabelledPair:
    id: str
    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    line: int
    meta: dict[str, Any] = field(default_factory=dict)  # the record's other fields (subset, agreement, ...)


def load_labelled_pairs(path: str | Path, limit: int | None = None) -> list[LabelledPair]:
    """Read human-labelled pairs; every bad line is reported as file:line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    items: list[LabelledPair] = []
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(str(path), n, "", f"not valid JSON: {e.msg}"))
                continue
            if not isinstance(rec, dict):
                problems.append(Problem(str(path), n, "", "expected a JSON object"))
                continue
            prompt = rec.get("prompt", rec.get("messages"))
            if isinstance(prompt, str) and prompt.strip():
                messages = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in prompt):
                messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
            else:
                problems.append(Problem(str(path), n, "prompt",
                                        "needs 'prompt': text or a list of {role, content} messages"))
                continue
            # An empty response is a real (bad) answer: PandaLM has some, and people rejected them.
            bad = [k for k in ("chosen", "rejected") if not isinstance(rec.get(k), str)]
            if bad:
                problems.append(Problem(str(path), n, bad[0], "must be text (the response)"))
                continue
            meta = {k: v for k, v in rec.items() if k not in {"id", "prompt", "messages", "chosen", "rejected"}}
            items.append(LabelledPair(str(rec.get("id", f"line-{n}")), messages, rec["chosen"], rec["rejected"], n,
                                      meta))
    if problems:
        raise SpecError(problems)
    if not items:
        raise SpecError([Problem(str(path), None, "", "no labelled pairs in the file")])
    return items


# ---- metrics -----------------------------------------------------------------------------------
def agreement(p: float, y: int) -> float:
    """1 when the label prefers the human's choice, 0.5 for an exact tie, else 0."""
    if p == 0.5:
        return 0.5
    return float((p > 0.5) == bool(y))


def brier(ps: list[float], ys: list[int]) -> float:
    return sum((p - y) ** 2 for p, y in zip(ps, ys, strict=True)) / len(ps)


def reliability_bins(ps: list[float], ys: list[int], bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins of predicted probability: count, mean prediction, observed frequency."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(ps) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            out.append({"lo": lo, "hi": hi, "count": len(idx),
                        "mean_p": sum(ps[i] for i in idx) / len(idx),
                        "observed": sum(ys[i] for i in idx) / len(idx)})
    return out


def ece(ps: list[float], ys: list[int], bins: int = 10) -> float:
    n = len(ps)
    return sum(b["count"] / n * abs(b["observed"] - b["mean_p"]) for b in reliability_bins(ps, ys, bins))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class JudgeEvalReport:
    judge: str
    spec_hash: str
    method: str
    model_id: str
    engine: str
    dataset: str
    n: int
    metrics: dict[str, float | None]
    invalid_reasons: dict[str, int]
    per_principle: list[dict[str, Any]]
    bins: dict[str, list[dict[str, float]]]
    accuracy: AccuracyReport | None = None           # agreement, length baseline, per subset (valid pairs)
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> low/high/n/method
    group_metrics: dict[str, float] = field(default_factory=dict)  # agreement[agreement=3/3], ...
    plot: str | None = None
    items_file: str | None = None
    seconds: float = 0.0
    pairs_per_second: float | None = None
    evaluation_rows: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def compute_metrics(items: list[dict[str, Any]], both_orderings: bool) -> tuple[dict[str, float | None], dict]:
    """Metrics from per-item results: each has y (1 if A is the human's choice), status, p_a,
    p_a_first, p_a_swapped, position_consistent."""
    valid = [it for it in items if it["status"] == "ok"]
    n = len(items)
    ys = [it["y"] for it in valid]
    ps = [it["p_a"] for it in valid]
    m: dict[str, float | None] = {
        "n": float(n), "n_valid": float(len(valid)),
        "invalid_rate": (n - len(valid)) / n if n else None,
        "agreement": _mean([agreement(p, y) for p, y in zip(ps, ys, strict=True)]),
        "agreement_all_items": _mean([agreement(it["p_a"], it["y"]) if it["status"] == "ok" else 0.5
                                      for it in items]),
        "brier": brier(ps, ys) if valid else None,
        "ece": ece(ps, ys) if valid else None,
        "mean_confidence": _mean([max(p, 1 - p) for p in ps]),
    }
    bins = {"both" if both_orderings else "label": reliability_bins(ps, ys)}
    firsts = [(it["p_a_first"], it["y"]) for it in valid if it.get("p_a_first") is not None]
    if firsts:
        fp, fy = [p for p, _ in firsts], [y for _, y in firsts]
        m["agreement_first_ordering"] = _mean([agreement(p, y) for p, y in firsts])
        m["brier_first_ordering"] = brier(fp, fy)
        m["ece_first_ordering"] = ece(fp, fy)
        bins["first_ordering"] = reliability_bins(fp, fy)
    swapped = [(it["p_a_swapped"], it["y"]) for it in valid if it.get("p_a_swapped") is not None]
    if swapped:
        m["agreement_swapped_ordering"] = _mean([agreement(p, y) for p, y in swapped])
        cons = [it["position_consistent"] for it in valid if it.get("position_consistent") is not None]
        m["position_consistency"] = _mean([float(c) for c in cons])
        # P(A) > .5 with A first picks the first shown; P(A) < .5 with A second picks the first shown.
        picks = [float(it["p_a_first"] > 0.5) for it in valid] + [float(it["p_a_swapped"] < 0.5) for it in valid]
        m["first_position_rate"] = _mean(picks)
    return m, bins


def per_principle_breakdown(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agreement per principle (with its Wilson interval) and, where items carry ``longer`` (the
    length baseline's score), the length baseline on the pairs that principle labelled."""
    stats: dict[str, dict[str, Any]] = {}
    for it in items:
        for d in it.get("principles", []):
            s = stats.setdefault(d["id"], {"principle": d["id"], "n": 0, "invalid": 0, "_agree": [], "_cons": [],
                                           "_longer": []})
            s["n"] += 1
            if d["status"] != "ok":
                s["invalid"] += 1
                continue
            s["_agree"].append(agreement(d["p"], it["y"]))
            if it.get("longer") is not None:
                s["_longer"].append(it["longer"])
            if d.get("consistent") is not None:
                s["_cons"].append(float(d["consistent"]))
    out = []
    for s in stats.values():
        iv = wilson(sum(s["_agree"]), len(s["_agree"]))
        out.append({"principle": s["principle"], "n": s["n"], "invalid": s["invalid"],
                    "agreement": _mean(s["_agree"]),
                    "agreement_low": iv.low if iv.n else None, "agreement_high": iv.high if iv.n else None,
                    "length_baseline": _mean(s["_longer"]), "position_consistency": _mean(s["_cons"])})
    return sorted(out, key=lambda r: r["principle"])


def rate_intervals(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Wilson intervals of the rates ``compute_metrics`` reports (ties count half), as details."""
    valid = [it for it in items if it["status"] == "ok"]
    out = {"agreement_all_items": wilson(sum(agreement(it["p_a"], it["y"]) if it["status"] == "ok" else 0.5
                                             for it in items), len(items)),
           "invalid_rate": wilson(len(items) - len(valid), len(items))}
    for key, field_ in (("agreement_first_ordering", "p_a_first"), ("agreement_swapped_ordering", "p_a_swapped")):
        ps = [(it[field_], it["y"]) for it in valid if it.get(field_) is not None]
        if ps:
            out[key] = wilson(sum(agreement(p, y) for p, y in ps), len(ps))
    cons = [it["position_consistent"] for it in valid if it.get("position_consistent") is not None]
    if cons:
        out["position_consistency"] = wilson(sum(bool(c) for c in cons), len(cons))
    return {k: interval_details(v) for k, v in out.items() if v.n}


def reliability_plot(bins: dict[str, list[dict[str, float]]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    styles = {"both": ("both orderings averaged", "C0", "o"), "label": ("label", "C0", "o"),
              "first_ordering": ("first ordering only", "C1", "s")}
    width = 0.1 / (len(bins) + 1)
    for k, (name, bs) in enumerate(bins.items()):
        label, color, marker = styles.get(name, (name, f"C{k + 2}", "^"))
        if not bs:
            continue
        ax.plot([b["mean_p"] for b in bs], [b["observed"] for b in bs], marker=marker, color=color, label=label)
        hx.bar([(b["lo"] + b["hi"]) / 2 + (k - (len(bins) - 1) / 2) * width for b in bs],
               [b["count"] for b in bs], width=width, color=color, alpha=0.8)
    ax.set_ylabel("observed frequency (A is the human's choice)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hx.set_xlabel("predicted P(A better)")
    hx.set_ylabel("pairs")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---- the evaluation ----------------------------------------------------------------------------
def run_judge_eval(store: Store | None, path: str | Path, spec: JudgeSpec, engine: Engine, *,
                   model_id: str, engine_kind: str, principles: list[PrincipleRef] | None = None,
                   constitution_hash: str | None = None, limit: int | None = None, batch_size: int = 64,
                   seed: int = 0, out_dir: str | Path | None = Path("data") / "runs" / "judge-eval",
                   progress: bool = True, by: list[str] | None = None, shard: str | None = None) -> JudgeEvalReport:
    """``by``: fields of the file to break agreement down by (default: the subset-like ones it has).
    ``shard``: ``"I/N"``, only the pairs whose item id hashes to shard I (after ``limit``); the items of
    the N shards together are exactly the items of one unsharded run (the A/B coin and the judge's
    seeds come from the item id, not its position), and each shard writes its own evaluation rows."""
    from tqdm.auto import tqdm

    from cai.sharding import shard_note, take_shard

    started = time.time()
    path = Path(path)
    pairs = take_shard(load_labelled_pairs(path, limit), shard, lambda p: content_hash("judge-eval", p.id))
    if not pairs:
        raise LookupError(f"{path}: shard {shard} holds none of the pairs; use fewer shards")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    judge = Judge(spec, engine, principles, seed=seed)
    # A seeded coin per item: the human's choice is A or B.
    flips = [random.Random(int(content_hash("judge-eval-flip", seed, p.id), 16)).random() < 0.5 for p in pairs]
    inputs = [PairInput(content_hash("judge-eval", p.id), p.messages,
                        p.rejected if flip else p.chosen, p.chosen if flip else p.rejected)
              for p, flip in zip(pairs, flips, strict=True)]
    items: list[dict[str, Any]] = []
    judge_seconds = 0.0
    bar = tqdm(total=len(inputs), desc=f"judge-eval ({spec.name}, {engine_kind})", unit="pair",
               disable=not progress)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        t0 = time.time()
        verdicts = judge.judge(chunk, seed_offset=seed)  # cot: seeded per pair, not by position
        judge_seconds += time.time() - t0
        for k, v in enumerate(verdicts):
            p = pairs[start + k]
            items.append({"id": p.id, "line": p.line, "y": 0 if flips[start + k] else 1, "status": v.status,
                          "longer": longer_pick(p.chosen, p.rejected),
                          "reason": v.reason, "p_a": v.p_a, "p_a_first": v.p_a_first,
                          "p_a_swapped": v.p_a_swapped, "position_consistent": v.position_consistent,
                          "score_a": v.score_a, "score_b": v.score_b, "principle_ids": v.principle_ids,
                          "principles": v.raw.get("principles", [])})
        bar.update(len(chunk))
    bar.close()

    metrics, bins = compute_metrics(items, spec.both_orderings and spec.pairwise)
    # Agreement beside the longer-answer baseline on the same valid pairs, and per subset.
    ok = [i for i, it in enumerate(items) if it["status"] == "ok"]
    acc = accuracy_report([agreement(items[i]["p_a"], items[i]["y"]) for i in ok], [pairs[i].chosen for i in ok],
                          [pairs[i].rejected for i in ok], [pairs[i].meta for i in ok], by)
    intervals, group_metrics = rate_intervals(items), {}
    for name, value, details in evaluation_metrics(acc, "agreement"):
        intervals[name] = details
        (group_metrics if "[" in name else metrics)[name] = value
    report = JudgeEvalReport(
        judge=spec.name, spec_hash=spec.hash, method=spec.method, model_id=model_id, engine=engine_kind,
        dataset=str(path), n=len(items), metrics=metrics,
        invalid_reasons=dict(Counter(it["reason"] for it in items if it["status"] != "ok")),
        per_principle=per_principle_breakdown(items) if principles else [], bins=bins,
        accuracy=acc, intervals=intervals, group_metrics=group_metrics,
        seconds=round(time.time() - started, 2),
        pairs_per_second=round(len(items) / judge_seconds, 3) if judge_seconds else None,
        details={"dataset_sha256": digest, "limit": limit, "seed": seed, "constitution_hash": constitution_hash,
                 "answer_tokens": judge.answer.pieces if judge.answer else None, "engine_calls": judge.calls,
                 **shard_note(shard)},
    )
    # The tag names the rows' evaluation: a shard's rows are their own (unsharded tags are unchanged).
    tag = content_hash(spec.hash, model_id, engine_kind, digest, limit, seed, constitution_hash,
                       *([by] if by else []), *([f"shard:{shard}"] if shard else []), length=8)
    if out_dir is not None:
        out_dir = Path(out_dir)
        stem = f"{spec.name}-{path.stem}-{tag}"
        report.plot = str(reliability_plot(
            bins, out_dir / f"{stem}.png",
            f"{spec.name} ({spec.method}) on {path.name}, n={len(items)}\n{model_id} via {engine_kind}"))
        items_file = out_dir / f"{stem}.jsonl"
        with items_file.open("w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")
        report.items_file = str(items_file)
    if store is not None:
        report.evaluation_rows = write_evaluations(store, report, tag)
    return report


def write_evaluations(store: Store, report: JudgeEvalReport, tag: str) -> int:
    with store.run("judge-eval", {"judge": report.judge, "spec_hash": report.spec_hash,
                                  "dataset": report.dataset, **report.details}) as run:
        n = _write_evaluation_rows(store, report, tag, run["run_id"])
        run["summary"] = {"metrics": report.metrics, "rows": n, "seconds": report.seconds}
    return n


def _write_evaluation_rows(store: Store, report: JudgeEvalReport, tag: str, run_id: str) -> int:
    common = {"judge": report.judge, "method": report.method, "model_id": report.model_id,
              "engine": report.engine, "n": report.n, "plot": report.plot, "items_file": report.items_file,
              **report.details}
    rows, stamp = [], now()
    values = {m: v for m, v in report.metrics.items()
              if v is not None and not (isinstance(v, float) and math.isnan(v))} | report.group_metrics
    for metric, value in values.items():
        # `n` stays the number of pairs evaluated; an interval's own count is `interval_n`.
        iv = report.intervals.get(metric)
        extra = {} if iv is None else {k: v for k, v in iv.items() if k != "n"} | {"interval_n": iv["n"]}
        rows.append({"evaluation_id": content_hash("judge_quality", tag, metric), "kind": "judge_quality",
                     "subject_id": report.spec_hash, "baseline_id": None, "dataset": report.dataset,
                     "metric": metric, "value": float(value), "details": json.dumps(common | extra, default=str),
                     "run_id": run_id, "created_at": stamp})
    for pr in report.per_principle:
        for metric in ("agreement", "length_baseline", "position_consistency"):
            if pr[metric] is None:
                continue
            name = f"{metric}[{pr['principle']}]"
            extra = ({"low": pr["agreement_low"], "high": pr["agreement_high"], "interval_method": "wilson",
                      "interval_n": pr["n"] - pr["invalid"]} if metric == "agreement" else {})
            rows.append({"evaluation_id": content_hash("judge_quality", tag, name), "kind": "judge_quality",
                         "subject_id": report.spec_hash, "baseline_id": None, "dataset": report.dataset,
                         "metric": name, "value": float(pr[metric]),
                         "details": json.dumps({**common, "principle": pr["principle"], "principle_n": pr["n"],
                                                "principle_invalid": pr["invalid"], **extra}, default=str),
                         "run_id": run_id, "created_at": stamp})
    return store.insert("evaluations", rows)
