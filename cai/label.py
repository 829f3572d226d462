"""Stage: label pairs of responses with an AI judge (RLAIF) and write ``comparisons``.

Pairs come from the store:

``initial_vs_revised``
    each initial generation (A) against its final ``ok`` revision (B) from the critique stage (the
    ``sl_cai`` view: one pair per generation, constitution, critique model and critique settings);
``two_samples``
    samples 0 (A) and 1 (B) of the same prompt, model, sampling parameters and stage.
``contrast``
    RLCD (cai/contrast.py): the policy answers each prompt under a principle's follow (A) and
    violate (B) system prompt, same seed; labelled by construction with ``contrast.confidence``,
    or by the judge with ``contrast.rescore`` (RLCD-rescore).

Identical texts are skipped (no preference to learn). A comparison's id is a hash of (pair kind,
both response ids, judge spec hash, constitution hash, judge model, seed), so a re-run skips
what is there and a crashed run resumes; invalid comparisons are stored as such and not retried
(a new seed or spec gives new ids). The judge engine is recorded but is not part of the id: the
same model through transformers or vLLM is the same judge.

Work goes in chunks of ``batch_size`` pairs: per chunk one batched engine call per read position
(all pairs x principles x orderings; plus one generate call for cot) and one short write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cai.constitution import Constitution, load_constitution, resolve_constitution
from cai.contrast import ContrastConfig
from cai.engines.base import Engine
from cai.judge import Judge, PairInput, PrincipleRef
from cai.judge_spec import REPO_ROOT, JudgeSpec, load_judge_spec, resolve_judge_spec
from cai.sharding import ShardField, shard_note, take_shard
from cai.store import Store, content_hash

PairKind = Literal["initial_vs_revised", "two_samples", "contrast"]
EngineKind = Literal["transformers", "vllm", "openai"]


class LabelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    judge: str = Field("judges/multiple-choice.yaml", description="Judge spec: path or name under judges/.")
    constitution: str = Field("constitutions/harmless.yaml", description="Path or name under constitutions/.")
    pairs: list[PairKind] = Field(default_factory=lambda: ["initial_vs_revised", "two_samples"])
    model: str | None = Field(None, description="Judge model; default: the spec's.")
    engine: EngineKind | None = Field(None, description="Judge engine; default: the spec's.")
    engine_options: dict[str, Any] = Field(default_factory=dict)
    generation_stage: str = Field("initial", description="two_samples: generations of this stage.")
    split: Literal["train", "test"] | None = Field(None, description="Only prompts of this split.")
    limit: int | None = Field(None, ge=1, description="At most this many pairs (in a stable order).")
    batch_size: int = Field(32, ge=1, description="Pairs per engine call and per write.")
    seed: int = Field(0, description="Seeds the principle draw per pair (and cot sampling).")
    shard: ShardField = Field(None, description="I/N: only shard I of N (by comparison id); see cai.sharding.")
    changed: bool = Field(False, description="Only pairs an edit of the constitution touched: judge again the pairs "
                                             "labelled under an older version whose principles changed, carry the "
                                             "other labels over (cai.relabel).")
    contrast: ContrastConfig = Field(default_factory=ContrastConfig,
                                     description="How 'contrast' pairs (RLCD) are sampled and labelled.")


def principle_refs(constitution: Constitution) -> list[PrincipleRef]:
    return [PrincipleRef(p.id, p.judge, p.weight, p.contrast.follow if p.contrast else None,
                         p.contrast.violate if p.contrast else None) for p in constitution.principles]


def comparison_id(pair_kind: str, prompt_id: str, a_id: str, b_id: str, spec_hash: str,
                  constitution_hash: str | None, judge_model_id: str, seed: int) -> str:
    return content_hash("comparison", pair_kind, prompt_id, a_id, b_id, spec_hash, constitution_hash,
                        judge_model_id, seed)


def draw_key(pair_kind: str, prompt_id: str, a_id: str, b_id: str) -> str:
    """What seeds a pair's principle draw: the pair itself, not the constitution version, so an edit
    redraws only where it must (see ``cai.relabel``)."""
    return content_hash("pair", pair_kind, prompt_id, a_id, b_id)


def select_pairs(store: Store, kinds: list[str], *, generation_stage: str = "initial",
                 split: str | None = None) -> list[dict[str, Any]]:
    """Candidate pairs from the store, in a stable order (kind, prompt, ids)."""
    split_sql = " AND p.split = ?" if split else ""
    out: list[dict[str, Any]] = []
    if "initial_vs_revised" in kinds:
        # sl_cai (the critique stage's view) holds the final ok revision of each initial generation,
        # per constitution, critique model and critique parameters.
        out += store.query(f"""
            SELECT 'initial_vs_revised' AS pair_kind, p.prompt_id, p.messages,
                   p.generation_id AS a_id, p.initial_response AS a_text, p.revision_id AS b_id, p.revision AS b_text
            FROM sl_cai p
            WHERE p.revision IS NOT NULL {split_sql}
            ORDER BY p.prompt_id, p.generation_id, p.revision_id""", [split] if split else [])
    if "two_samples" in kinds:
        out += store.query(f"""
            SELECT 'two_samples' AS pair_kind, g0.prompt_id, p.messages,
                   g0.generation_id AS a_id, g0.text AS a_text, g1.generation_id AS b_id, g1.text AS b_text
            FROM generations g0
            JOIN generations g1 ON g1.prompt_id = g0.prompt_id AND g1.model_id = g0.model_id
                 AND g1.params_hash = g0.params_hash AND g1.stage = g0.stage AND g1.sample_index = 1
            JOIN prompts p ON p.prompt_id = g0.prompt_id
            WHERE g0.sample_index = 0 AND g0.stage = ? {split_sql}
            ORDER BY g0.prompt_id, g0.generation_id""", [generation_stage, *([split] if split else [])])
    for r in out:
        r["messages"] = json.loads(r["messages"])
    return out


def load_spec(cfg_judge: str | Path) -> JudgeSpec:
    return load_judge_spec(resolve_judge_spec(cfg_judge))


def find_constitution(name_or_path: str | Path) -> Constitution:
    """A constitution by path, or by name under ./constitutions, else under the cai checkout's."""
    try:
        path = resolve_constitution(name_or_path)
    except FileNotFoundError:
        path = resolve_constitution(name_or_path, root=REPO_ROOT)
    return load_constitution(path)


def judge_engine(spec: JudgeSpec, model_path: str, engine: str | None = None,
                 engine_options: dict[str, Any] | None = None) -> Engine:
    """The judge's engine (process-cached). The spec's engine_options apply to the spec's engine only."""
    from cai.engines import get_engine

    kind = engine or spec.engine
    base = spec.engine_options if kind == spec.engine else {}
    return get_engine(kind, model_path, **{**base, **(engine_options or {})})


@dataclass
class LabelPlan:
    """What a label run has to do, read from the store by the driver (workers never open it)."""

    spec: JudgeSpec
    constitution: Constitution
    engine_kind: str
    judge_model_id: str
    judge_path: str
    todo: list[dict[str, Any]]  # pairs, each with its comparison_id
    summary: dict[str, Any]
    carried: list[dict[str, Any]] = field(default_factory=list)  # `--changed`: rows carried over, not judged


def plan_label(store: Store, cfg: LabelConfig) -> LabelPlan:
    from cai.models import resolve_in_store

    spec = load_spec(cfg.judge)
    constitution = find_constitution(cfg.constitution)
    engine_kind = cfg.engine or spec.engine
    judge_model_id, judge_path = resolve_in_store(store, cfg.model or spec.model)

    pairs = select_pairs(store, list(cfg.pairs), generation_stage=cfg.generation_stage, split=cfg.split)
    summary: dict[str, Any] = {"judge": spec.name, "judge_spec_hash": spec.hash, "method": spec.method,
                               "constitution_hash": constitution.hash, "judge_model_id": judge_model_id,
                               "engine": engine_kind, "candidates": len(pairs), **shard_note(cfg.shard)}
    identical = [p for p in pairs if (p["a_text"] or "").strip() == (p["b_text"] or "").strip()]
    pairs = [p for p in pairs if (p["a_text"] or "").strip() != (p["b_text"] or "").strip()]
    if cfg.limit:
        pairs = pairs[:cfg.limit]
    for p in pairs:
        p["comparison_id"] = comparison_id(p["pair_kind"], p["prompt_id"], p["a_id"], p["b_id"], spec.hash,
                                           constitution.hash, judge_model_id, cfg.seed)
        p["draw_key"] = draw_key(p["pair_kind"], p["prompt_id"], p["a_id"], p["b_id"])
    if not pairs and not identical:
        raise LookupError(
            f"no pairs to label in {store.path}: run `cai generate --n 2` (two_samples) or the critique "
            "stage (initial_vs_revised) first")
    pairs = take_shard(pairs, cfg.shard, lambda p: p["comparison_id"])
    have = store.existing_ids("comparisons", "comparison_id", [p["comparison_id"] for p in pairs])
    todo = [p for p in pairs if p["comparison_id"] not in have]
    summary.update(pairs=len(pairs), identical_skipped=len(identical), already_done=len(pairs) - len(todo),
                   labelled=0, invalid=0)
    carried: list[dict[str, Any]] = []
    if cfg.changed:
        from cai.relabel import plan_label_changed

        todo, carried, summary["changed"] = plan_label_changed(store, constitution, spec, judge_model_id, todo, cfg.seed)
    return LabelPlan(spec, constitution, engine_kind, judge_model_id, str(judge_path), todo, summary, carried)


def compute_label(cfg: LabelConfig, plan: LabelPlan, *, engine: Engine | None = None,
                  stats: dict[str, Any] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Comparison rows for ``plan.todo``, one list per chunk of ``batch_size`` pairs; no store
    access, so a Ray worker can run it. Rows lack ``run_id`` and ``created_at`` (the writer's)."""
    spec, constitution, stats = plan.spec, plan.constitution, stats if stats is not None else {}
    engine = engine or judge_engine(spec, plan.judge_path, cfg.engine, cfg.engine_options)
    judge = Judge(spec, engine, principle_refs(constitution), seed=cfg.seed)
    params = json.dumps({"top_k": spec.top_k, "min_option_prob": spec.min_option_prob,
                         "both_orderings": spec.both_orderings, "principles": spec.principles.model_dump(),
                         "clamp": spec.effective_clamp,
                         "sampling": spec.effective_sampling().model_dump() if spec.method == "cot" else None,
                         "answer_tokens": judge.answer.pieces if judge.answer else None})
    for start in range(0, len(plan.todo), cfg.batch_size):
        chunk = plan.todo[start:start + cfg.batch_size]
        # The draw key names the pair, not the constitution version, so an edit moves no other pair's
        # principle draw (cai.draws); cot samples are seeded by it too, never by the pair's position.
        inputs = [PairInput(p["draw_key"], p["messages"], p["a_text"], p["b_text"]) for p in chunk]
        t0 = time.time()
        verdicts = judge.judge(inputs, seed_offset=cfg.seed)
        stats["engine_seconds"] = stats.get("engine_seconds", 0.0) + time.time() - t0
        rows = []
        for p, v in zip(chunk, verdicts, strict=True):
            rows.append({
                "comparison_id": p["comparison_id"], "prompt_id": p["prompt_id"], "pair_kind": p["pair_kind"],
                "response_a_id": p["a_id"], "response_b_id": p["b_id"],
                "response_a": p["a_text"], "response_b": p["b_text"],
                "principle_ids": v.principle_ids, "constitution_hash": constitution.hash,
                "judge_name": spec.name, "judge_spec_hash": spec.hash, "judge_model_id": plan.judge_model_id,
                "judge_engine": plan.engine_kind, "method": spec.method,
                "p_a_first": v.p_a_first, "p_a_swapped": v.p_a_swapped, "p_a": v.p_a,
                "position_consistent": v.position_consistent, "score_a": v.score_a, "score_b": v.score_b,
                "raw_output": json.dumps(v.raw), "status": v.status, "reason": v.reason,
                "seed": cfg.seed, "params": params,
            })
        yield rows


def start_label_run(store: Store, cfg: LabelConfig, plan: LabelPlan) -> str:
    run_id = store.start_run("label", {**cfg.model_dump(), "judge_spec_hash": plan.spec.hash,
                                       "constitution_hash": plan.constitution.hash})
    with store.write() as con:
        store.register_constitution(plan.constitution, con=con)
        store.register_model(plan.judge_model_id, "base", plan.judge_path, con=con)
    return run_id


def run_label(store: Store, cfg: LabelConfig, *, engine: Engine | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Fill ``comparisons`` for the pairs in the store; returns a summary."""
    from cai.generate import write_rows

    started = time.time()
    summary_c: dict[str, Any] = {}
    if "contrast" in cfg.pairs:
        # RLCD pairs are sampled and labelled by construction (cai/contrast.py), not read from the store.
        from cai.models import resolve_in_store

        spec, constitution = load_spec(cfg.judge), find_constitution(cfg.constitution)
        judge_model_id, _ = resolve_in_store(store, cfg.model or spec.model)
        summary_c = run_contrast(store, cfg, spec, constitution, judge_model_id, cfg.engine or spec.engine,
                                 progress=progress)
        if cfg.pairs == ["contrast"]:
            return summary_c
        cfg = cfg.model_copy(update={"pairs": [k for k in cfg.pairs if k != "contrast"]})
    plan = plan_label(store, cfg)
    summary = plan.summary
    summary.update({k: v for k, v in summary_c.items() if k.startswith("contrast")})
    if not plan.todo and not plan.carried:
        summary["seconds"] = round(time.time() - started, 2)
        return summary

    # Build the engine before writing anything: a bad engine must leave no run row or model behind.
    engine = engine or judge_engine(plan.spec, plan.judge_path, cfg.engine, cfg.engine_options)
    run_id = start_label_run(store, cfg, plan)
    if plan.carried:
        summary["carried"] = store.insert("comparisons", [{**r, "run_id": run_id} for r in plan.carried])
    if not plan.todo:
        summary["seconds"] = round(time.time() - started, 2)
        store.finish_run(run_id, "ok", summary)
        return summary
    stats: dict[str, Any] = {}
    bar = tqdm(total=len(plan.todo), desc=f"label ({plan.spec.name}, {plan.engine_kind})", unit="pair",
               disable=not progress)
    try:
        for rows in compute_label(cfg, plan, engine=engine, stats=stats):
            summary["invalid"] += sum(r["status"] != "ok" for r in rows)
            summary["labelled"] += write_rows(store, "comparisons", rows, run_id)
            bar.update(len(rows))
    except BaseException as e:
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                         summary, error=repr(e))
        raise
    finally:
        bar.close()
    judge_seconds = stats.get("engine_seconds", 0.0)
    summary["seconds"] = round(time.time() - started, 2)
    summary["pairs_per_second"] = round(len(plan.todo) / judge_seconds, 3) if judge_seconds else None
    store.finish_run(run_id, "ok", summary)
    return summary


def contrast_spec_hash(cfg: LabelConfig, spec: JudgeSpec) -> str:
    """What labels a contrast pair: the by-construction confidence, or the judge (rescore)."""
    c = cfg.contrast
    return spec.hash if c.rescore else content_hash("rlcd", c.confidence)


def run_contrast(store: Store, cfg: LabelConfig, spec: JudgeSpec, constitution: Constitution,
                 judge_model_id: str, engine_kind: str, *, progress: bool = True) -> dict[str, Any]:
    """The ``contrast`` pair kind: sample, label and store RLCD pairs (cai/contrast.py)."""
    from cai.contrast import make_contrast_pairs
    from cai.models import resolve_in_store

    started = time.time()
    c = cfg.contrast
    run_id = store.start_run("label", {**cfg.model_dump(), "pairs": ["contrast"], "judge_spec_hash": spec.hash,
                                       "constitution_hash": constitution.hash})
    judge, extra = None, {}
    with store.write() as con:
        store.register_constitution(constitution, con=con)
    if c.rescore:
        _, judge_path = resolve_in_store(store, cfg.model or spec.model)
        store.register_model(judge_model_id, "base", judge_path)
        judge = Judge(spec, judge_engine(spec, judge_path, cfg.engine, cfg.engine_options),
                      principle_refs(constitution), seed=cfg.seed)
        extra = {"judge_name": spec.name, "judge_model_id": judge_model_id, "judge_engine": engine_kind,
                 "method": f"rlcd_rescore:{spec.method}"}
    bar = tqdm(desc="label (contrast)", unit="prompt", disable=not progress)
    try:
        summary = make_contrast_pairs(store, c, constitution, seed=cfg.seed, split=cfg.split,
                                      batch_size=cfg.batch_size, run_id=run_id,
                                      label_spec_hash=contrast_spec_hash(cfg, spec), judge=judge,
                                      progress=bar, **extra)
    except BaseException as e:
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", {}, error=repr(e))
        raise
    finally:
        bar.close()
    summary["contrast_seconds"] = round(time.time() - started, 2)
    store.finish_run(run_id, "ok", summary)
    return summary
