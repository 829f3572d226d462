"""Judging a policy against its baseline for the evaluation stage: pairwise comparisons, win statistics, Elo."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from cai.elo import fit_elo
from cai.engines.base import Engine
from cai.models import resolve_in_store
from cai.store import Store, content_hash, now

if TYPE_CHECKING:
    from cai.evaluate import EvaluateConfig


PAIR_KIND = "policy_vs_baseline"


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _stderr(xs: Sequence[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _judge_pairs(store: Store, cfg: EvaluateConfig, prompts: list[dict[str, Any]],
                 pol: dict[str, list[dict]], base: dict[str, list[dict]], *, judge_engine: Engine | None,
                 run_id: str, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge (policy, baseline) per prompt into ``comparisons``; returns the comparison rows (new and
    old) and facts about the judge."""
    from cai.judge import Judge, PairInput
    from cai.label import comparison_id, find_constitution, load_spec, principle_refs
    from cai.label import judge_engine as make_judge_engine

    spec = load_spec(cfg.judge)
    constitution = find_constitution(cfg.constitution)
    judge_model_id, judge_path = resolve_in_store(store, cfg.judge_model or spec.model)
    engine_kind = cfg.judge_engine or spec.engine
    pairs = []
    for p in prompts:
        a, b = pol[p["prompt_id"]][0], base[p["prompt_id"]][0]
        cid = comparison_id(PAIR_KIND, p["prompt_id"], a["generation_id"], b["generation_id"], spec.hash,
                            constitution.hash, judge_model_id, cfg.seed)
        pairs.append({"comparison_id": cid, "prompt": p, "a": a, "b": b})
    have = store.existing_ids("comparisons", "comparison_id", [x["comparison_id"] for x in pairs])
    todo = [x for x in pairs if x["comparison_id"] not in have]
    facts = {"judge": spec.name, "judge_spec_hash": spec.hash, "method": spec.method,
             "constitution": constitution.name, "constitution_hash": constitution.hash,
             "judge_model_id": judge_model_id, "judge_engine": engine_kind,
             "principle_tags": {p.id: list(p.tags) for p in constitution.principles},
             "comparisons_new": 0, "comparisons_reused": len(pairs) - len(todo)}
    if todo:
        with store.write() as con:
            store.register_constitution(constitution, con=con)
            store.register_model(judge_model_id, "base", judge_path, con=con)
        engine = judge_engine or make_judge_engine(spec, judge_path, cfg.judge_engine, cfg.judge_engine_options)
        judge = Judge(spec, engine, principle_refs(constitution), seed=cfg.seed)
        params = json.dumps({"top_k": spec.top_k, "min_option_prob": spec.min_option_prob,
                             "both_orderings": spec.both_orderings, "principles": spec.principles.model_dump(),
                             "clamp": spec.effective_clamp,
                             "sampling": spec.effective_sampling().model_dump() if spec.method == "cot" else None,
                             "answer_tokens": judge.answer.pieces if judge.answer else None, "evaluate_run_id": run_id})

        def row(x: dict[str, Any], **verdict: Any) -> dict[str, Any]:
            return {"comparison_id": x["comparison_id"], "prompt_id": x["prompt"]["prompt_id"], "pair_kind": PAIR_KIND,
                    "response_a_id": x["a"]["generation_id"], "response_b_id": x["b"]["generation_id"],
                    "response_a": x["a"]["text"], "response_b": x["b"]["text"],
                    "constitution_hash": constitution.hash, "judge_name": spec.name, "judge_spec_hash": spec.hash,
                    "judge_model_id": judge_model_id, "judge_engine": engine_kind, "method": spec.method,
                    "seed": cfg.seed, "params": params, "run_id": run_id, "created_at": now(), **verdict}

        # Identical responses are ties: no judge call, but the same principle draw so tags still apply.
        same = [x for x in todo if (x["a"]["text"] or "").strip() == (x["b"]["text"] or "").strip()]
        todo = [x for x in todo if x not in same]
        facts["comparisons_new"] += store.insert("comparisons", [row(
            x, principle_ids=[pr.id for pr in judge.choose_principles(x["comparison_id"])], p_a_first=0.5,
            p_a_swapped=0.5 if spec.both_orderings else None, p_a=0.5, position_consistent=None,
            raw_output=json.dumps({"identical": True}), status="ok", reason="identical") for x in same])
        bar = tqdm(total=len(todo), desc=f"judge ({spec.name}, {engine_kind})", unit="pair", disable=not progress)
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            inputs = [PairInput(x["comparison_id"], x["prompt"]["messages"], x["a"]["text"] or "",
                                x["b"]["text"] or "") for x in chunk]
            verdicts = judge.judge(inputs, seed_offset=cfg.seed)  # cot: seeded per pair, not by position
            facts["comparisons_new"] += store.insert("comparisons", [row(
                x, principle_ids=v.principle_ids, p_a_first=v.p_a_first, p_a_swapped=v.p_a_swapped, p_a=v.p_a,
                position_consistent=v.position_consistent, score_a=v.score_a, score_b=v.score_b,
                raw_output=json.dumps(v.raw), status=v.status, reason=v.reason)
                for x, v in zip(chunk, verdicts, strict=True)])
            bar.update(len(chunk))
        bar.close()
    rows = store.query("SELECT comparison_id, prompt_id, principle_ids, p_a_first, p_a_swapped, p_a, "
                       "position_consistent, status, reason FROM comparisons "
                       "WHERE comparison_id IN (SELECT unnest(?))", [[x["comparison_id"] for x in pairs]])
    return rows, facts


def _win_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok" and r["p_a"] is not None]
    ps = [float(r["p_a"]) for r in ok]
    firsts = [float(r["p_a_first"]) for r in ok if r["p_a_first"] is not None and r["reason"] != "identical"]
    swapped = [float(r["p_a_swapped"]) for r in ok if r["p_a_swapped"] is not None and r["reason"] != "identical"]
    consistent = [bool(r["position_consistent"]) for r in ok if r["position_consistent"] is not None]
    from cai.stats import mean_interval, wilson

    # 95 % intervals: the win rate is a mean of soft labels (mean ± 1.96 standard errors, clipped to
    # [0, 1]); position consistency is a proportion of pairs (Wilson).
    win = mean_interval(ps)
    pc = wilson(sum(consistent), len(consistent))
    ci = {"ci_low": None if not ps else max(0.0, win.low), "ci_high": None if not ps else min(1.0, win.high),
          "position_consistency_ci": None if not consistent else [pc.low, pc.high],
          "position_consistency_n": len(consistent)}
    return {"win_rate": _mean(ps), "stderr": _stderr(ps), "n": len(ps), **ci,
            "wins": sum(p > 0.5 for p in ps), "losses": sum(p < 0.5 for p in ps), "ties": sum(p == 0.5 for p in ps),
            "identical": sum(r["reason"] == "identical" for r in ok), "invalid": len(rows) - len(ok),
            "win_rate_policy_first": _mean(firsts), "win_rate_policy_second": _mean(swapped),
            "position_consistency": _mean([float(c) for c in consistent])}


def _elo(store: Store, facts: dict[str, Any], prior: float) -> tuple[dict[str, float], dict[str, Any]]:
    rows = store.query("""
        SELECT c.comparison_id, ga.model_id AS a, gb.model_id AS b, c.p_a
        FROM comparisons c
        JOIN generations ga ON ga.generation_id = c.response_a_id
        JOIN generations gb ON gb.generation_id = c.response_b_id
        WHERE c.pair_kind = ? AND c.status = 'ok' AND c.p_a IS NOT NULL
          AND c.judge_spec_hash = ? AND c.constitution_hash = ?
        ORDER BY c.comparison_id""", [PAIR_KIND, facts["judge_spec_hash"], facts["constitution_hash"]])
    games = [(r["a"], r["b"], float(r["p_a"])) for r in rows]
    ratings = fit_elo(games, prior=prior)
    per: dict[str, dict[str, float]] = {m: {"games": 0, "score": 0.0} for m in ratings}
    for a, b, s in games:
        per[a]["games"] += 1
        per[a]["score"] += s
        per[b]["games"] += 1
        per[b]["score"] += 1 - s
    return ratings, {"games": per, "comparisons_hash": content_hash([r["comparison_id"] for r in rows]),
                     "n_comparisons": len(rows)}
