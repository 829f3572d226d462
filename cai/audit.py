"""Audit each principle of a constitution: against people, and against the other principles.

``audit_against`` (``cai constitution audit FILE --against PAIRS.jsonl``): every human-labelled pair
is judged by every principle (the judge spec with ``principles.mode: all``; both orderings; one
batched engine call per read position per chunk), with a seeded coin deciding whether the human's
choice is shown as A or B. Per principle:

* ``agreement``: share of its valid labels that prefer the human's choice (a label of exactly 0.5
  counts half), with a 95 % Wilson interval;
* ``position_consistency``: share of its labels where both orderings prefer the same response;
* ``disagrees_with_others``: share of pairs where its side differs from the side of the mean label
  of the other principles on the same pair;
* a flag, "rewrite or drop", when its agreement is at or below chance (0.5).

``audit_store`` (``cai constitution audit`` without ``--against``) reads the store's own labels
(``comparisons.raw_output`` holds each principle's label): pairs of principles that contradict each
other on pairs both labelled (each decided, opposite sides), and principles that almost never decide
(labels within ``near`` of 0.5).

Results go to ``evaluations`` (kind ``constitution_audit``, subject = the constitution hash, one row
per principle and metric), so versions can be compared with SQL; a markdown report and a PNG of
agreement per principle with its interval are written to ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from cai.constitution import Constitution
from cai.engines.base import Engine
from cai.judge import Judge, PairInput, PrincipleRef
from cai.judge_spec import JudgeSpec
from cai.stats import Interval, wilson
from cai.store import Store, content_hash, now

CHANCE = 0.5


def _side(p: float | None) -> int:
    return 0 if p is None else (p > 0.5) - (p < 0.5)


@dataclass
class PrincipleAudit:
    principle: str
    n: int = 0
    invalid: int = 0
    agreement: Interval | None = None
    position_consistency: Interval | None = None
    disagrees_with_others: Interval | None = None
    flag: str | None = None

    def row(self) -> dict[str, Any]:
        return {"principle": self.principle, "n": self.n, "invalid": self.invalid,
                "agreement": self.agreement.fmt() if self.agreement else None,
                "position_consistency": self.position_consistency.fmt() if self.position_consistency else None,
                "disagrees_with_others": self.disagrees_with_others.fmt() if self.disagrees_with_others else None,
                "flag": self.flag or ""}


@dataclass
class AuditReport:
    constitution: str
    constitution_hash: str
    dataset: str
    judge: str
    judge_spec_hash: str
    model_id: str
    n_pairs: int
    principles: list[PrincipleAudit] = field(default_factory=list)
    ensemble_agreement: Interval | None = None
    engine_calls: int = 0
    markdown_file: str | None = None
    plot: str | None = None
    evaluation_rows: int = 0

    def markdown(self) -> str:
        lines = [f"## Principle audit: {self.constitution} `{self.constitution_hash[:10]}` vs people",
                 "", f"{self.n_pairs} human-labelled pairs from `{self.dataset}`, judge `{self.judge}` "
                 f"(`{self.judge_spec_hash[:10]}`) on `{self.model_id}`, every principle on every pair, both "
                 f"orderings; intervals are 95 % Wilson.", ""]
        if self.ensemble_agreement:
            lines += [f"All principles averaged: agreement {self.ensemble_agreement.fmt()}.", ""]
        lines += ["| principle | n | agreement with people | position consistency | disagrees with others | flag |",
                  "|---|---|---|---|---|---|"]
        for a in self.principles:
            r = a.row()
            lines.append(f"| `{a.principle}` | {a.n} | {r['agreement']} | {r['position_consistency']} | "
                         f"{r['disagrees_with_others']} | {r['flag']} |")
        flagged = [a.principle for a in self.principles if a.flag]
        lines += ["", f"At or below chance (rewrite or drop): {', '.join(flagged) if flagged else 'none'}."]
        if self.plot:
            lines += ["", f"Plot: `{self.plot}`"]
        return "\n".join(lines) + "\n"


def audit_against(store: Store | None, constitution: Constitution, pairs_path: str | Path, spec: JudgeSpec,
                  engine: Engine, *, model_id: str, limit: int | None = None, batch_size: int = 32, seed: int = 0,
                  out_dir: str | Path | None = Path("data") / "runs" / "audit", progress: bool = True) -> AuditReport:
    """Judge human-labelled pairs by every principle and measure each against people."""
    from tqdm.auto import tqdm

    from cai.judge_eval import load_labelled_pairs

    path = Path(pairs_path)
    items = load_labelled_pairs(path, limit)
    if not items:
        raise LookupError(f"{path}: no labelled pairs")
    all_spec = spec.model_copy(update={"principles": spec.principles.model_copy(update={"mode": "all"})})
    refs = [PrincipleRef(p.id, p.judge, p.weight) for p in constitution.principles]
    judge = Judge(all_spec, engine, refs, seed=seed)
    flips = [random.Random(int(content_hash("audit-flip", seed, it.id), 16)).random() < 0.5 for it in items]
    inputs = [PairInput(content_hash("audit", it.id), it.messages, it.rejected if f else it.chosen,
                        it.chosen if f else it.rejected) for it, f in zip(items, flips, strict=True)]
    per: dict[str, dict[str, list[float]]] = {p.id: defaultdict(list) for p in constitution.principles}
    ensemble: list[float] = []
    bar = tqdm(total=len(inputs), desc=f"audit ({len(refs)} principles)", unit="pair", disable=not progress)
    for start in range(0, len(inputs), batch_size):
        verdicts = judge.judge(inputs[start:start + batch_size], seed_offset=seed + start)
        bar.update(len(verdicts))
        for k, v in enumerate(verdicts):
            y = 0 if flips[start + k] else 1  # 1: the human's choice is A
            if v.p_a is not None:
                ensemble.append(_agree(v.p_a, y))
            labels = {d["id"]: d for d in v.raw.get("principles", [])}
            ok = {pid: d["p"] for pid, d in labels.items() if d.get("status") == "ok"}
            for pid, d in labels.items():
                if d.get("status") != "ok":
                    per[pid]["invalid"].append(1)
                    continue
                per[pid]["agree"].append(_agree(d["p"], y))
                if d.get("consistent") is not None:
                    per[pid]["consistent"].append(float(d["consistent"]))
                others = [q for o, q in ok.items() if o != pid]
                if others and _side(sum(others) / len(others)) != 0 and _side(d["p"]) != 0:
                    per[pid]["disagree"].append(float(_side(d["p"]) != _side(sum(others) / len(others))))
    bar.close()
    report = AuditReport(constitution.name, constitution.hash, str(path), spec.name, spec.hash, model_id,
                         len(items), engine_calls=judge.calls,
                         ensemble_agreement=wilson(sum(ensemble), len(ensemble)) if ensemble else None)
    for p in constitution.principles:
        d = per[p.id]
        a = PrincipleAudit(p.id, n=len(d["agree"]), invalid=len(d["invalid"]))
        a.agreement = wilson(sum(d["agree"]), len(d["agree"]))
        a.position_consistency = wilson(sum(d["consistent"]), len(d["consistent"]))
        a.disagrees_with_others = wilson(sum(d["disagree"]), len(d["disagree"]))
        if a.n and a.agreement.estimate <= CHANCE:
            a.flag = "rewrite or drop"
        report.principles.append(a)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    tag = content_hash(constitution.hash, spec.hash, model_id, digest, limit, seed, length=10)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"audit-{constitution.name}-{constitution.hash[:8]}-{path.stem}-{tag}"
        report.plot = str(agreement_plot(report, out / f"{stem}.png"))
        md = out / f"{stem}.md"
        md.write_text(report.markdown(), encoding="utf-8")
        report.markdown_file = str(md)
    if store is not None:
        report.evaluation_rows = _write(store, report, tag, dataset=f"{path.name}#{digest}",
                                        details={"limit": limit, "seed": seed, "engine_calls": judge.calls})
    return report


def _agree(p: float, y: int) -> float:
    """1 when the label prefers the human's choice, 0 when it prefers the other, 0.5 for exactly 0.5."""
    return 0.5 if p == 0.5 else float((p > 0.5) == (y == 1))


def agreement_plot(report: AuditReport, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [a for a in report.principles if a.agreement and a.n]
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(rows), 2) + 1.2))
    ys = list(range(len(rows)))
    est = [a.agreement.estimate for a in rows]
    lo = [a.agreement.estimate - a.agreement.low for a in rows]
    hi = [a.agreement.high - a.agreement.estimate for a in rows]
    colors = ["tab:red" if a.flag else "tab:blue" for a in rows]
    for y, e, l_, h, c in zip(ys, est, lo, hi, colors, strict=True):
        ax.errorbar(e, y, xerr=[[l_], [h]], fmt="o", color=c, capsize=3)
    ax.axvline(CHANCE, color="grey", ls="--", lw=1)
    ax.set_yticks(ys, [a.principle for a in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("agreement with people (95 % Wilson interval)")
    ax.set_title(f"{report.constitution} {report.constitution_hash[:8]} on {Path(report.dataset).name}, "
                 f"n={report.n_pairs}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _write(store: Store, report: AuditReport, tag: str, *, dataset: str, details: dict[str, Any]) -> int:
    run_id = store.start_run("audit", {"constitution_hash": report.constitution_hash, "dataset": report.dataset,
                                       "judge_spec_hash": report.judge_spec_hash, **details})
    common = {"constitution": report.constitution, "judge": report.judge, "judge_spec_hash": report.judge_spec_hash,
              "model_id": report.model_id, "plot": report.plot, "report": report.markdown_file, **details}
    rows, stamp = [], now()
    metrics = [("agreement", None, report.ensemble_agreement, None)] + [
        (m, a.principle, getattr(a, m), a.flag) for a in report.principles
        for m in ("agreement", "position_consistency", "disagrees_with_others")]
    for metric, principle, iv, flag in metrics:
        if iv is None or iv.n == 0:
            continue
        name = f"{metric}[{principle}]" if principle else f"{metric}[all]"
        rows.append({"evaluation_id": content_hash("constitution_audit", tag, name), "kind": "constitution_audit",
                     "subject_id": report.constitution_hash, "baseline_id": None, "dataset": dataset,
                     "metric": name, "value": iv.estimate,
                     "details": json.dumps({**common, "principle": principle, "interval": iv.as_dict(),
                                            "flag": flag}, default=str),
                     "run_id": run_id, "created_at": stamp})
    n = store.insert("evaluations", rows)
    store.finish_run(run_id, "ok", {"rows": n, "pairs": report.n_pairs})
    return n


# ---- the store's own labels ---------------------------------------------------------------------------
def audit_store(store: Store, constitution_hash: str | None = None, *, limit: int | None = None,
                near: float = 0.05, decided: float = 0.05, write: bool = True) -> dict[str, Any]:
    """Contradicting principle pairs and principles that rarely decide, from ``comparisons.raw_output``.

    A label "decides" when it is more than ``decided`` away from 0.5; two principles contradict on a
    pair when both decide it and pick different sides. Labels of the same pair (kind, responses)
    from different comparisons (other seeds, versions, ensembles) are pooled per principle (mean)."""
    where, args = ["status = 'ok'", "raw_output IS NOT NULL"], []
    if constitution_hash:
        where.append("constitution_hash LIKE ?")
        args.append(constitution_hash + "%")
    sql = ("SELECT pair_kind, response_a_id, response_b_id, raw_output FROM comparisons WHERE "
           + " AND ".join(where) + " AND carried_from IS NULL ORDER BY comparison_id")
    if limit:
        sql += f" LIMIT {int(limit)}"
    labels: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in store.query(sql, args):
        for d in json.loads(r["raw_output"]).get("principles", []):
            if d.get("status") == "ok" and d.get("p") is not None:
                labels[(r["pair_kind"], r["response_a_id"], r["response_b_id"])][d["id"]].append(d["p"])
    if not labels:
        raise LookupError(f"no judged comparisons in {store.path}" + (f" for {constitution_hash}" if constitution_hash
                                                                      else "") + "; run `cai label` first")
    per: dict[str, list[float]] = defaultdict(list)
    both: dict[tuple[str, str], list[float]] = defaultdict(list)
    for by_principle in labels.values():
        mean = {pid: sum(v) / len(v) for pid, v in by_principle.items()}
        for pid, p in mean.items():
            per[pid].append(p)
        for a, b in combinations(sorted(mean), 2):
            if abs(mean[a] - 0.5) > decided and abs(mean[b] - 0.5) > decided:
                both[(a, b)].append(float(_side(mean[a]) != _side(mean[b])))
    principles = []
    for pid, ps in sorted(per.items()):
        undecided = wilson(sum(abs(p - 0.5) <= near for p in ps), len(ps))
        principles.append({"principle": pid, "labels": len(ps), "near_half": undecided.fmt(),
                           "near_half_rate": undecided.estimate,
                           "mean_distance_from_half": round(sum(abs(p - 0.5) for p in ps) / len(ps), 4),
                           "flag": "almost never decides" if undecided.estimate >= 0.8 else ""})
    contradictions = []
    for (a, b), xs in sorted(both.items()):
        iv = wilson(sum(xs), len(xs))
        contradictions.append({"principle_a": a, "principle_b": b, "pairs_both_decided": len(xs),
                               "contradiction_rate": iv.fmt(), "rate": iv.estimate,
                               "flag": "contradict" if iv.n >= 5 and iv.low > 0.5 else ""})
    contradictions.sort(key=lambda r: -r["rate"])
    out = {"constitution_hash": constitution_hash, "pairs": len(labels), "principles": principles,
           "contradictions": contradictions, "near": near, "decided": decided}
    if write and constitution_hash:
        run_id = store.start_run("audit", {"constitution_hash": constitution_hash, "limit": limit, "store": True})
        stamp, rows = now(), []
        for r in principles:
            rows.append({"evaluation_id": content_hash("constitution_audit", "store", constitution_hash, limit,
                                                       r["principle"]),
                         "kind": "constitution_audit", "subject_id": constitution_hash, "dataset": "store",
                         "metric": f"near_half_rate[{r['principle']}]", "value": r["near_half_rate"],
                         "details": json.dumps(r), "run_id": run_id, "created_at": stamp})
        store.insert("evaluations", rows)
        store.finish_run(run_id, "ok", {"rows": len(rows), "pairs": len(labels)})
    return out


def store_audit_markdown(result: dict[str, Any]) -> str:
    lines = [f"## Principle audit over the store's labels ({result['pairs']} pairs)", "",
             "| principle | labels | share near 0.5 | mean abs(p-0.5) | flag |", "|---|---|---|---|---|"]
    for r in result["principles"]:
        lines.append(f"| `{r['principle']}` | {r['labels']} | {r['near_half']} | {r['mean_distance_from_half']} | "
                     f"{r['flag']} |")
    lines += ["", "| principle A | principle B | pairs both decided | contradiction rate | flag |",
              "|---|---|---|---|---|"]
    for r in result["contradictions"][:20]:
        lines.append(f"| `{r['principle_a']}` | `{r['principle_b']}` | {r['pairs_both_decided']} | "
                     f"{r['contradiction_rate']} | {r['flag']} |")
    if not result["contradictions"]:
        lines.append("| (no pair was labelled by two principles: use `principles: {mode: all}` or k > 1) | | | | |")
    return "\n".join(lines) + "\n"
