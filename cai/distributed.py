"""Sharded stages: the driver plans, workers compute, the driver writes.

A shardable stage (generate, critique, label) is cut in three:

``plan_shards``  (driver, reads the store)  what is left to do, split into N shards by content hash;
``compute_shard`` (any process, no store)   loads the engine once, returns the shard's rows;
``ShardWriter``  (driver, the one writer)   writes rows in batches as shards finish, one run row.

Workers never open the DuckDB file (DuckDB allows one writing process), so a shard can run in a
Ray worker on another machine. Rows are keyed by content hashes and inserted with ``ON CONFLICT
DO NOTHING``, and a shard writes nothing until it returns, so a shard that dies and is retried
writes each row once. ``RunnerConfig`` is the run file's ``runner:`` section.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.sharding import split_shards
from cai.store import Store

SHARDABLE = ("generate", "critique", "label")
# Fault injection for tests: when this file exists, the first shard process to claim it exits hard
# (os._exit) after computing its first chunk, as a worker killed mid-shard would.
FAULT_ENV = "CAI_FAULT_EXIT_ONCE"


class RunnerConfig(BaseModel):
    """How the flow runs a stage's shards (``runner:`` in a run file)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "ray"] = Field("local", description="local: today's single process; ray: shards "
                                                               "as Prefect tasks on a RayTaskRunner.")
    address: str | None = Field("auto", description="Ray cluster address: auto (RAY_ADDRESS or a local "
                                                    "cluster), ray://host:10001, or host:6379.")
    shards: int = Field(2, ge=1, description="Shards per stage (one engine each).")
    resources_per_shard: dict[str, float] = Field(default_factory=dict,
                                                  description="Ray resources of one shard task, e.g. {GPU: 1}.")
    write_batch: int = Field(512, ge=1, description="Rows per write transaction on the driver.")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra ray.init arguments.")

    def remote_options(self) -> dict[str, Any]:
        """``resources_per_shard`` as ray.remote options (CPU/GPU are Ray's num_cpus/num_gpus)."""
        res = dict(self.resources_per_shard)
        out: dict[str, Any] = {}
        if "GPU" in res:
            out["num_gpus"] = res.pop("GPU")
        if "CPU" in res:
            out["num_cpus"] = res.pop("CPU")
        if res:
            out["resources"] = res
        return out


@dataclass
class ShardPlan:
    """One shard's work: everything a worker needs, nothing that needs the store."""

    stage: str
    index: int
    count: int
    section: Any  # the stage's pydantic config
    plan: Any  # GeneratePlan | LabelPlan | CritiquePlan with only this shard's items


@dataclass
class CritiquePlan:
    constitution: Any
    model_id: str
    model_path: str
    todo: list[Any]
    summary: dict[str, Any]


_TABLE = {"generate": "generations", "critique": "revisions", "label": "comparisons"}


def _plan(stage: str, section: Any, store: Store) -> tuple[Any, Any]:
    """(the whole stage's plan, the key its items shard by)."""
    if stage == "generate":
        from cai.generate import plan_generate

        return plan_generate(store, section), lambda p: p["prompt_id"]
    if stage == "label":
        from cai.label import plan_label

        return plan_label(store, section), lambda p: p["comparison_id"]
    if stage == "critique":
        from cai.constitution import load_constitution, resolve_constitution
        from cai.critique import plan
        from cai.models import resolve_in_store

        constitution = load_constitution(resolve_constitution(section.constitution))
        model_id, model_path = resolve_in_store(store, section.model)
        pending = plan(store, section, constitution, model_id)
        if not pending:
            raise LookupError(f"no generations in {store.path} match; run `cai generate` first")
        todo = [p for p in pending if p.next_round <= section.rounds]
        summary = {"generations": len(pending), "rounds": section.rounds, "constitution_hash": constitution.hash,
                   "model_id": model_id, "engine": section.engine, "revised": 0,
                   "params_hash": section.params_hash(constitution)}
        return CritiquePlan(constitution, model_id, str(model_path), todo, summary), lambda p: p.generation_id
    raise ValueError(f"stage {stage!r} cannot be sharded (shardable: {', '.join(SHARDABLE)})")


def plan_shards(stage: str, section: Any, store: Store, count: int) -> tuple[Any, list[ShardPlan]]:
    """The stage's plan and its non-empty shards (``section.shard``, if set, is applied first)."""
    whole, key = _plan(stage, section, store)
    parts = split_shards(whole.todo, count, key)
    return whole, [ShardPlan(stage, i, count, section, replace(whole, todo=items))
                   for i, items in enumerate(parts) if items]


def _maybe_die() -> None:
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    claimed = f"{marker}.claimed.{os.getpid()}"
    try:
        os.rename(marker, claimed)  # atomic: exactly one process claims the fault
    except OSError:
        return
    os._exit(17)


def compute_shard(shard: ShardPlan) -> list[dict[str, Any]]:
    """Every row of one shard (run in a worker: loads the engine once, process-cached; no store)."""
    stage, section, plan = shard.stage, shard.section, shard.plan
    if stage == "generate":
        from cai.generate import compute_generate

        chunks = compute_generate(section, plan)
    elif stage == "label":
        from cai.label import compute_label

        chunks = compute_label(section, plan)
    elif stage == "critique":
        from cai.critique import compute_critique

        chunks = compute_critique(section, plan.constitution, plan.model_id, plan.model_path, plan.todo)
    else:
        raise ValueError(f"stage {stage!r} cannot be sharded")
    rows: list[dict[str, Any]] = []
    for chunk in chunks:
        rows += chunk
        _maybe_die()
    return rows


class ShardWriter:
    """The driver's side: one run row for the stage, rows written in batches as shards return."""

    def __init__(self, store: Store, stage: str, section: Any, whole: Any, *, batch: int = 512):
        from cai.generate import write_rows

        self._write_rows = write_rows
        self.store, self.stage, self.batch, self.whole = store, stage, batch, whole
        self.summary: dict[str, Any] = dict(whole.summary)
        self.summary.update(written=0, shards_done=0, write_seconds=0.0)
        self.run_id = self._start(section, whole)

    def _start(self, section: Any, whole: Any) -> str:
        if self.stage == "generate":
            run_id = self.store.start_run("generate", section.model_dump())
            self.store.register_model(whole.model_id, "base", whole.model_path)
            return run_id
        if self.stage == "label":
            from cai.label import start_label_run

            return start_label_run(self.store, section, whole)
        from cai.critique import start_critique_run

        return start_critique_run(self.store, section, whole.constitution, whole.model_id, whole.model_path)

    def add(self, rows: list[dict[str, Any]]) -> int:
        t0 = time.time()
        written = 0
        for start in range(0, len(rows), self.batch):
            written += self._write_rows(self.store, _TABLE[self.stage], rows[start:start + self.batch], self.run_id)
        self.summary["written"] += written
        self.summary["shards_done"] += 1
        self.summary["write_seconds"] += time.time() - t0
        return written

    def finish(self, status: str = "ok", error: str | None = None) -> dict[str, Any]:
        self.summary["write_seconds"] = round(self.summary["write_seconds"], 3)
        key = {"generate": "generated", "label": "labelled", "critique": "revised"}[self.stage]
        self.summary[key] = self.summary["written"]
        self.store.finish_run(self.run_id, status, self.summary, error=error)
        return self.summary


def run_sharded_locally(stage: str, section: Any, store: Store, count: int) -> dict[str, Any]:
    """Plan, compute each shard in this process, write: what the Ray path does, without Ray."""
    whole, shards = plan_shards(stage, section, store, count)
    if not shards:
        return {**whole.summary, "written": 0}
    writer = ShardWriter(store, stage, section, whole)
    for s in shards:
        writer.add(compute_shard(s))
    return writer.finish()


def default_ray_env() -> dict[str, str]:
    """Environment a local Ray worker needs to import this checkout."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": root + (os.pathsep + path if path else "")}
