"""Stage 1: sample responses from a policy model for the prompts in the store.

Resumable and shardable by construction: a generation's id is a hash of (prompt, model, sampling parameters,
sample index), so a re-run computes the ids it would write, asks the store which exist, and
generates only the missing ones. Work is written in chunks of ``batch_size`` prompts, each
chunk one engine call (the engine batches internally) and one short write transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cai.engines import Engine, SamplingParams, get_engine, item_seed
from cai.models import DEFAULT_MODEL, resolve_in_store
from cai.sharding import ShardField, shard_note, take_shard
from cai.store import Store, content_hash, now


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="Built-in name, model id from the store, or HF folder.")
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="e.g. base_url for openai")
    n: int = Field(1, ge=1, description="Responses per prompt.")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)
    split: Literal["train", "test", "benchmark"] | None = Field(
        None, description="Only prompts of this split (None: train and test; benchmark prompts only when asked).")
    category: str | None = None
    limit: int | None = Field(None, ge=1, description="At most this many prompts.")
    prompt_ids: list[str] | None = Field(None, description="Exactly these prompts, in this order (overrides "
                                                           "split, category and limit).")
    batch_size: int = Field(64, ge=1, description="Prompts per engine call and per write.")
    stage: str = "initial"
    shard: ShardField = Field(None, description="I/N: only shard I of N (by prompt id); see cai.sharding.")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              n=self.n, seed=self.seed, stop=tuple(self.stop))


def generation_id(prompt_id: str, model_id: str, params: SamplingParams, sample_index: int, stage: str) -> str:
    return content_hash("generation", prompt_id, model_id, params.hash(), sample_index, stage)


def select_prompts(store: Store, *, split: str | None = None, category: str | None = None,
                   limit: int | None = None, prompt_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Prompts by split / category (first ``limit`` in ingestion order), or exactly ``prompt_ids`` in
    that order. Prompts of the ``benchmark`` split (evaluation-only yardsticks such as XSTest) are
    never selected unless that split or their ids are asked for, so no training stage sees them."""
    from cai.preferences import HUMAN_TAG

    if prompt_ids is not None:
        rows = store.query("SELECT prompt_id, messages FROM prompts WHERE prompt_id IN (SELECT unnest(?))",
                           [list(prompt_ids)])
        order = {pid: i for i, pid in enumerate(prompt_ids)}
        rows.sort(key=lambda r: order[r["prompt_id"]])
        for r in rows:
            r["messages"] = json.loads(r["messages"])
        return rows
    # Prompts that only came in with people's preference pairs (`cai ingest-preferences`) are
    # yardsticks, not the policy's prompts: generation, PPO and evaluation never pick them.
    where, args = ["NOT list_contains(coalesce(tags, []::VARCHAR[]), ?)"], [HUMAN_TAG]
    if split:
        where.append("split = ?")
        args.append(split)
    else:
        where.append("split IS DISTINCT FROM 'benchmark'")
    if category:
        where.append("category = ?")
        args.append(category)
    sql = "SELECT prompt_id, messages FROM prompts WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at, source, source_line, prompt_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = store.query(sql, args)
    for r in rows:
        r["messages"] = json.loads(r["messages"])
    return rows


@dataclass
class GeneratePlan:
    """What a generate run has to do, read from the store by the driver (workers never open it)."""

    model_id: str
    model_path: str
    params: SamplingParams
    todo: list[dict[str, Any]]  # prompts with at least one missing sample, each with its "ids"
    summary: dict[str, Any]


def plan_generate(store: Store, cfg: GenerateConfig) -> GeneratePlan:
    model_id, model_path = resolve_in_store(store, cfg.model)
    params = cfg.sampling()
    prompts = select_prompts(store, split=cfg.split, category=cfg.category, limit=cfg.limit,
                             prompt_ids=cfg.prompt_ids)
    if not prompts:
        raise LookupError(f"no prompts in {store.path} match; load some with `cai ingest FILE`")
    prompts = take_shard(prompts, cfg.shard, lambda p: p["prompt_id"])
    for p in prompts:
        p["ids"] = [generation_id(p["prompt_id"], model_id, params, i, cfg.stage) for i in range(cfg.n)]
    have = store.existing_ids("generations", "generation_id", [g for p in prompts for g in p["ids"]])
    todo = [p for p in prompts if not set(p["ids"]) <= have]
    summary: dict[str, Any] = {"prompts": len(prompts), "already_done": len(prompts) - len(todo),
                               "generated": 0, "tokens": 0, "model_id": model_id, "engine": cfg.engine,
                               **shard_note(cfg.shard)}
    return GeneratePlan(model_id, str(model_path), params, todo, summary)


def compute_generate(cfg: GenerateConfig, plan: GeneratePlan, *, engine: Engine | None = None,
                     stats: dict[str, Any] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Rows for ``plan.todo``, one list per engine call of ``batch_size`` prompts; no store access,
    so a Ray worker can run it. Rows lack ``run_id`` and ``created_at`` (the writer sets them)."""
    engine = engine or get_engine(cfg.engine, plan.model_path, **cfg.engine_options)
    params, stats = plan.params, stats if stats is not None else {}
    params_json = json.dumps(params.to_dict())
    for start in range(0, len(plan.todo), cfg.batch_size):
        chunk = plan.todo[start:start + cfg.batch_size]
        # Each prompt's seed comes from its id, so it samples the same text in a first run, a resumed
        # one or any shard, whatever else is in its engine call.
        chunk_params = replace(params, request_seeds=tuple(item_seed(params.seed, p["prompt_id"]) for p in chunk))
        t0 = time.time()
        outputs = engine.chat([p["messages"] for p in chunk], chunk_params)
        stats["engine_seconds"] = stats.get("engine_seconds", 0.0) + time.time() - t0
        rows = []
        for k, (p, completions) in enumerate(zip(chunk, outputs, strict=True)):
            for i, c in enumerate(completions):
                rows.append({
                    "generation_id": p["ids"][i], "prompt_id": p["prompt_id"],
                    "stage": cfg.stage, "model_id": plan.model_id, "engine": cfg.engine, "sample_index": i,
                    "seed": chunk_params.sample_seed(k, i), "params": params_json, "params_hash": params.hash(),
                    "text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                    "num_tokens": c.num_tokens, "finish_reason": c.finish_reason,
                })
        yield rows


def write_rows(store: Store, table: str, rows: list[dict[str, Any]], run_id: str | None) -> int:
    """Insert computed rows (``ON CONFLICT DO NOTHING``), stamping the run and time; rows written."""
    stamp = now()
    return store.insert(table, [{**r, "run_id": run_id, "created_at": stamp} for r in rows])


def run_generate(store: Store, cfg: GenerateConfig, *, engine: Engine | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Fill ``generations`` for the selected prompts; returns a summary."""
    started = time.time()
    plan = plan_generate(store, cfg)
    summary = plan.summary
    if not plan.todo:
        summary["seconds"] = round(time.time() - started, 2)
        return summary

    # The engine is built (and its options checked) before anything is written: a bad engine or a
    # missing --base-url must leave no run row and no model behind.
    engine = engine or get_engine(cfg.engine, plan.model_path, **cfg.engine_options)
    run_id = store.start_run("generate", cfg.model_dump())
    store.register_model(plan.model_id, "base", plan.model_path)
    stats: dict[str, Any] = {}
    bar = tqdm(total=len(plan.todo), desc=f"generate ({cfg.engine})", unit="prompt", disable=not progress)
    try:
        for rows in compute_generate(cfg, plan, engine=engine, stats=stats):
            summary["generated"] += write_rows(store, "generations", rows, run_id)
            summary["tokens"] += sum(r["num_tokens"] for r in rows)
            bar.update(len({r["prompt_id"] for r in rows}))
    except BaseException as e:
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                         summary, error=repr(e))
        raise
    finally:
        bar.close()
    gen_seconds = stats.get("engine_seconds", 0.0)
    summary["seconds"] = round(time.time() - started, 2)
    summary["tokens_per_second"] = round(summary["tokens"] / gen_seconds, 1) if gen_seconds else None
    store.finish_run(run_id, "ok", summary)
    return summary
