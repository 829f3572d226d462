"""Stage 1: sample responses from a policy model for the prompts in the store.

Resumable by construction: a generation's id is a hash of (prompt, model, sampling parameters,
sample index), so a re-run computes the ids it would write, asks the store which exist, and
generates only the missing ones. Work is written in chunks of ``batch_size`` prompts, each
chunk one engine call (the engine batches internally) and one short write transaction.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cai.engines import Engine, SamplingParams, get_engine, sample_seed
from cai.models import DEFAULT_MODEL, resolve_in_store
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
    split: Literal["train", "test"] | None = Field(None, description="Only prompts of this split.")
    category: str | None = None
    limit: int | None = Field(None, ge=1, description="At most this many prompts.")
    batch_size: int = Field(64, ge=1, description="Prompts per engine call and per write.")
    stage: str = "initial"

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              n=self.n, seed=self.seed, stop=tuple(self.stop))


def generation_id(prompt_id: str, model_id: str, params: SamplingParams, sample_index: int, stage: str) -> str:
    return content_hash("generation", prompt_id, model_id, params.hash(), sample_index, stage)


def select_prompts(store: Store, *, split: str | None = None, category: str | None = None,
                   limit: int | None = None) -> list[dict[str, Any]]:
    where, args = [], []
    if split:
        where.append("split = ?")
        args.append(split)
    if category:
        where.append("category = ?")
        args.append(category)
    sql = "SELECT prompt_id, messages FROM prompts"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at, source, source_line, prompt_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = store.query(sql, args)
    for r in rows:
        r["messages"] = json.loads(r["messages"])
    return rows


def contiguous_chunks(prompts: list[dict[str, Any]], todo: list[dict[str, Any]],
                      batch_size: int) -> list[tuple[int, list[dict[str, Any]]]]:
    """``todo`` cut into chunks of at most ``batch_size`` prompts that sit next to each other in
    ``prompts``, each with the index of its first prompt there (what its seed is offset by)."""
    index = {p["prompt_id"]: k for k, p in enumerate(prompts)}
    chunks: list[tuple[int, list[dict[str, Any]]]] = []
    for p in todo:
        k = index[p["prompt_id"]]
        if chunks and len(chunks[-1][1]) < batch_size and index[chunks[-1][1][-1]["prompt_id"]] == k - 1:
            chunks[-1][1].append(p)
        else:
            chunks.append((k, [p]))
    return chunks


def run_generate(store: Store, cfg: GenerateConfig, *, engine: Engine | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Fill ``generations`` for the selected prompts; returns a summary."""
    started = time.time()
    model_id, model_path = resolve_in_store(store, cfg.model)
    params = cfg.sampling()
    prompts = select_prompts(store, split=cfg.split, category=cfg.category, limit=cfg.limit)
    if not prompts:
        raise LookupError(f"no prompts in {store.path} match; load some with `cai ingest FILE`")

    wanted = {p["prompt_id"]: [generation_id(p["prompt_id"], model_id, params, i, cfg.stage) for i in range(cfg.n)]
              for p in prompts}
    have = store.existing_ids("generations", "generation_id", [g for ids in wanted.values() for g in ids])
    todo = [p for p in prompts if not set(wanted[p["prompt_id"]]) <= have]
    summary: dict[str, Any] = {"prompts": len(prompts), "already_done": len(prompts) - len(todo),
                               "generated": 0, "tokens": 0, "model_id": model_id, "engine": cfg.engine}
    if not todo:
        summary["seconds"] = round(time.time() - started, 2)
        return summary

    # The engine is built (and its options checked) before anything is written: a bad engine or a
    # missing --base-url must leave no run row and no model behind.
    engine = engine or get_engine(cfg.engine, model_path, **cfg.engine_options)
    run_id = store.start_run("generate", cfg.model_dump())
    params_json = json.dumps(params.to_dict())
    gen_seconds = 0.0
    bar = tqdm(total=len(todo), desc=f"generate ({cfg.engine})", unit="prompt", disable=not progress)
    try:
        store.register_model(model_id, "base", model_path)
        for first, chunk in contiguous_chunks(prompts, todo, cfg.batch_size):
            # Request i of an engine call samples with seed + i, so offsetting the seed by the chunk's
            # position among *all* selected prompts gives every prompt the same seed whether it is
            # generated in a first run or in a resumed one.
            chunk_params = SamplingParams(**{**params.to_dict(), "seed": params.seed + first})
            t0 = time.time()
            outputs = engine.chat([p["messages"] for p in chunk], chunk_params)
            gen_seconds += time.time() - t0
            rows, stamp = [], now()
            for k, (p, completions) in enumerate(zip(chunk, outputs, strict=True)):
                for i, c in enumerate(completions):
                    rows.append({
                        "generation_id": wanted[p["prompt_id"]][i], "prompt_id": p["prompt_id"],
                        "stage": cfg.stage, "model_id": model_id, "engine": cfg.engine, "sample_index": i,
                        "seed": sample_seed(chunk_params.seed, k, i), "params": params_json, "params_hash": params.hash(),
                        "text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                        "num_tokens": c.num_tokens, "finish_reason": c.finish_reason,
                        "run_id": run_id, "created_at": stamp,
                    })
                    summary["tokens"] += c.num_tokens
            summary["generated"] += store.insert("generations", rows)
            bar.update(len(chunk))
    except BaseException as e:
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                         summary, error=repr(e))
        raise
    finally:
        bar.close()
    summary["seconds"] = round(time.time() - started, 2)
    summary["tokens_per_second"] = round(summary["tokens"] / gen_seconds, 1) if gen_seconds else None
    store.finish_run(run_id, "ok", summary)
    return summary
