"""RLCD contrast pairs (Yang et al. 2023): preference pairs made by construction, no judge needed.

For each prompt one principle that has a ``contrast:`` block is drawn (seeded by the prompt and
the run's seed, in proportion to the principles' weights). The policy answers the prompt twice,
once with the principle's ``follow`` instruction as the system prompt and once with its
``violate`` instruction, with the same sampling seed, so the two answers differ by the
instruction rather than by sampling noise. Both answers go to ``generations`` (stages
``contrast_follow`` / ``contrast_violate``, the system prompt and principle in ``params``), and
the pair goes to ``comparisons`` with ``pair_kind = 'contrast'``, A = the follow answer, and the
label ``P(A better) = confidence``: the instructions do not always work on a small model, so the
label is a soft one and the pair may come out the wrong way round.

With ``rescore`` (RLCD-rescore), the label stage's judge labels the pair instead (the system
prompts are not shown to it) and the by-construction label stays in ``raw_output``.

Work is batched across prompts: per chunk one ``chat`` call for all follow conversations and one
for all violate conversations (request k of both calls gets the same seed), and one write.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.constitution import Constitution, Principle
from cai.engines.base import Engine, SamplingParams, item_seed
from cai.generate import generation_id, select_prompts
from cai.models import DEFAULT_MODEL
from cai.store import Store, content_hash, now

PAIR_KIND = "contrast"
STAGES = ("contrast_follow", "contrast_violate")


class ContrastConfig(BaseModel):
    """How contrast pairs are sampled and labelled (the ``contrast`` section of the label stage)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="Policy that answers under both instructions.")
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict)
    confidence: float = Field(0.9, ge=0.5, le=1.0,
                              description="P(follow answer is better), the by-construction soft label.")
    rescore: bool = Field(False, description="RLCD-rescore: label the pair with the judge instead.")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(128, ge=1)
    category: str | None = Field(None, description="Only prompts of this category.")
    limit: int | None = Field(None, ge=1, description="At most this many prompts.")
    pairs_per_prompt: int = Field(1, ge=1, le=64, description=(
        "Pairs per prompt: draw j gets its own principle and seed (drawn from the prompt id and j), so "
        "contrast data grows in bulk without new prompts."))

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              n=1, seed=seed)


def contrast_principles(constitution: Constitution) -> list[Principle]:
    usable = [p for p in constitution.principles if p.contrast is not None]
    if not usable:
        raise ValueError(f"constitution {constitution.name!r} has no principle with a 'contrast:' block; "
                         "add contrast: {follow: ..., violate: ...} to at least one principle")
    return usable


def choose_principle(principles: list[Principle], prompt_id: str, seed: int) -> Principle:
    """One principle per prompt, by weight, seeded by the prompt itself (not its position)."""
    rng = random.Random(int(content_hash("contrast-principle", seed, prompt_id), 16))
    return rng.choices(principles, weights=[p.weight for p in principles], k=1)[0]


def with_system(messages: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """The conversation with ``instruction`` as its system prompt (replacing any system turn)."""
    return [{"role": "system", "content": instruction}, *[m for m in messages if m["role"] != "system"]]


def make_contrast_pairs(store: Store, cfg: ContrastConfig, constitution: Constitution, *, seed: int,
                        split: str | None, batch_size: int, run_id: str, engine: Engine | None = None,
                        label_spec_hash: str, judge: Any = None, judge_name: str = "rlcd",
                        judge_model_id: str | None = None, judge_engine: str | None = None,
                        method: str = "contrast", progress: Any = None) -> dict[str, Any]:
    """Sample and store contrast pairs for the selected prompts; returns counts.

    ``judge`` (a :class:`cai.judge.Judge`) re-scores the pairs when ``cfg.rescore`` is set.
    """
    from cai.engines import get_engine
    from cai.models import resolve_in_store

    principles = contrast_principles(constitution)
    model_id, model_path = resolve_in_store(store, cfg.model)
    prompts = select_prompts(store, split=split, category=cfg.category, limit=cfg.limit)
    summary: dict[str, Any] = {"contrast_prompts": len(prompts), "contrast_labelled": 0,
                               "contrast_identical_skipped": 0, "contrast_invalid": 0,
                               "contrast_model_id": model_id}
    if not prompts:
        return summary
    judge_model_id = judge_model_id or model_id

    def cid(p: dict[str, Any]) -> str:
        return content_hash("comparison", PAIR_KIND, p["prompt_id"], p["ids"][0], p["ids"][1], label_spec_hash,
                            constitution.hash, judge_model_id, seed)

    params = cfg.sampling(seed)
    # Draw j of a prompt is keyed "<prompt_id>" for j = 0 (so one pair per prompt is what it always
    # was) and "<prompt_id>#j" after: its principle and sampling seed depend on the key, not on order.
    prompts = [{**p, "draw": j, "key": p["prompt_id"] if j == 0 else f"{p['prompt_id']}#{j}"}
               for p in prompts for j in range(cfg.pairs_per_prompt)]
    for p in prompts:
        pr = choose_principle(principles, p["key"], seed)
        p["principle"] = pr
        # The principle and its instruction are in the id: a new instruction text gives a new answer.
        p["ids"] = [generation_id(p["prompt_id"], model_id, params, p["draw"],
                                  f"{stage}:{content_hash(pr.id, instr)}")
                    for stage, instr in zip(STAGES, (pr.contrast.follow, pr.contrast.violate), strict=True)]
        p["comparison_id"] = cid(p)
    have = store.existing_ids("comparisons", "comparison_id", [p["comparison_id"] for p in prompts])
    todo = [p for p in prompts if p["comparison_id"] not in have]
    summary["contrast_already_done"] = len(prompts) - len(todo)
    if not todo:
        return summary

    store.register_model(model_id, "base", model_path)
    engine = engine or get_engine(cfg.engine, model_path, **cfg.engine_options)
    for first in range(0, len(todo), batch_size):
        chunk = todo[first:first + batch_size]
        # As in generate: each prompt's seed comes from its id, so a resumed run or another shard
        # samples the same text; the follow and the violate call use the same seeds, so a pair
        # shares its seed.
        chunk_params = replace(params, request_seeds=tuple(item_seed(params.seed, p["key"]) for p in chunk))
        texts: list[list[str]] = []
        gen_rows: list[dict[str, Any]] = []
        stamp = now()
        stored = _stored_texts(store, [i for p in chunk for i in p["ids"]])
        if all(i in stored for p in chunk for i in p["ids"]):
            # Answered before (e.g. by-construction labels first, then a rescore): no new samples.
            texts = [[stored[p["ids"][side]] for p in chunk] for side in (0, 1)]
            for k, p in enumerate(chunk):
                p["seed"] = chunk_params.sample_seed(k)
        for side, stage in enumerate(STAGES if not texts else ()):
            convs = [with_system(p["messages"], (p["principle"].contrast.follow, p["principle"].contrast.violate)[side])
                     for p in chunk]
            outs = [c[0] for c in engine.chat(convs, chunk_params)]
            texts.append([o.text for o in outs])
            for k, (p, conv, o) in enumerate(zip(chunk, convs, outs, strict=True)):
                p["seed"] = chunk_params.sample_seed(k)
                gen_rows.append({
                    "generation_id": p["ids"][side], "prompt_id": p["prompt_id"], "stage": stage,
                    "model_id": model_id, "engine": cfg.engine, "sample_index": p["draw"], "seed": p["seed"],
                    "params": json.dumps({**params.to_dict(), "system": conv[0]["content"],
                                          "principle_id": p["principle"].id,
                                          "constitution_hash": constitution.hash}),
                    "params_hash": params.hash(), "text": o.text, "token_ids": o.token_ids,
                    "logprobs": o.logprobs, "num_tokens": o.num_tokens, "finish_reason": o.finish_reason,
                    "run_id": run_id, "created_at": stamp,
                })
        pairs = [(p, a, b) for p, a, b in zip(chunk, texts[0], texts[1], strict=True)]
        summary["contrast_identical_skipped"] += sum(a.strip() == b.strip() for _, a, b in pairs)
        pairs = [(p, a, b) for p, a, b in pairs if a.strip() != b.strip()]
        verdicts = _rescore(judge, pairs, seed) if cfg.rescore and judge is not None else None
        rows = []
        for k, (p, a, b) in enumerate(pairs):
            pr = p["principle"]
            raw: dict[str, Any] = {"principle": pr.id, "system_follow": pr.contrast.follow,
                                   "system_violate": pr.contrast.violate, "confidence": cfg.confidence,
                                   "seed": p["seed"]}
            row = {"p_a_first": cfg.confidence, "p_a_swapped": None, "p_a": cfg.confidence,
                   "position_consistent": None, "score_a": None, "score_b": None, "status": "ok", "reason": None}
            if verdicts is not None:
                v = verdicts[k]
                raw["judge"] = v.raw
                raw["judge_principle_ids"] = v.principle_ids
                row.update(p_a_first=v.p_a_first, p_a_swapped=v.p_a_swapped, p_a=v.p_a,
                           position_consistent=v.position_consistent, score_a=v.score_a, score_b=v.score_b,
                           status=v.status, reason=v.reason)
            summary["contrast_invalid"] += row["status"] != "ok"
            rows.append({
                "comparison_id": p["comparison_id"], "prompt_id": p["prompt_id"], "pair_kind": PAIR_KIND,
                "response_a_id": p["ids"][0], "response_b_id": p["ids"][1], "response_a": a, "response_b": b,
                "principle_ids": [pr.id], "constitution_hash": constitution.hash, "judge_name": judge_name,
                "judge_spec_hash": label_spec_hash, "judge_model_id": judge_model_id,
                "judge_engine": judge_engine or cfg.engine, "method": method, **row,
                "raw_output": json.dumps(raw), "seed": seed,
                "params": json.dumps({"contrast": cfg.model_dump(), "policy_model_id": model_id}),
                "run_id": run_id, "created_at": now(),
            })
        with store.write() as con:
            store.insert("generations", gen_rows, con=con)
            summary["contrast_labelled"] += store.insert("comparisons", rows, con=con)
        if progress is not None:
            progress.update(len(chunk))
    return summary


def _stored_texts(store: Store, ids: list[str]) -> dict[str, str]:
    if not ids or not store.path.exists():
        return {}
    rows = store.query(f"SELECT generation_id, text FROM generations WHERE generation_id IN "
                       f"({', '.join('?' for _ in ids)})", ids)
    return {r["generation_id"]: r["text"] for r in rows}


def _rescore(judge: Any, pairs: list[tuple[dict[str, Any], str, str]], seed_offset: int) -> list[Any]:
    from cai.judge import PairInput

    inputs = [PairInput(p["comparison_id"], [m for m in p["messages"] if m["role"] != "system"], a, b)
              for p, a, b in pairs]
    return judge.judge(inputs, seed_offset=seed_offset)
