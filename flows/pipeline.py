"""Prefect flows over the cai stages.

Each stage is a Prefect task that calls the same function the CLI calls (``cai.pipeline.run_stage``).
Stages are idempotent against the store, so Prefect's retries (and a re-run after a crash, even
``kill -9``) continue where the work stopped and write nothing twice. Tasks run in the flow's own
process, so a model loaded by one stage (``cai.engines.get_engine``) is reused by the next: one vLLM
engine serves generate, critique, label and evaluate when they share a model.

Every stage publishes Prefect artifacts: a markdown summary (rows written, rejects and why, time,
throughput) and, for training and evaluation, a table of the final metrics with links to the PNG plots.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cai.pipeline import TRAINING_STAGES, PipelineConfig, StageFailed, load_pipeline, run_stage
from cai.store import Store

# What counts as "rows written" in each stage's summary, for the artifact's headline.
_WRITTEN_KEYS = ("inserted", "generated", "revised", "labelled", "written", "rows_written")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        text = json.dumps(v, default=str)
        return text if len(text) <= 200 else text[:197] + "..."
    return str(v).replace("|", "\\|").replace("\n", " ")


def plots_of(summary: dict[str, Any]) -> list[str]:
    plots = list(summary.get("plots") or [])
    if summary.get("plot"):
        plots.append(summary["plot"])
    return [str(p) for p in plots]


def markdown_summary(stage: str, summary: dict[str, Any], seconds: float) -> str:
    written = {k: summary[k] for k in _WRITTEN_KEYS if k in summary}
    lines = [f"# {stage}", "", f"Finished in {seconds:.1f} s."]
    if written:
        lines.append("Rows written: " + ", ".join(f"{k} {v}" for k, v in written.items()) + ".")
    rejects = {k: v for k, v in summary.items() if k in ("status", "skipped", "invalid", "reasons", "identical")}
    if rejects:
        lines.append("Rejected or flagged: " + ", ".join(f"{k} {_cell(v)}" for k, v in rejects.items()) + ".")
    lines += ["", "| key | value |", "|---|---|"]
    for k, v in summary.items():
        if k in ("plots", "plot"):
            continue
        lines.append(f"| {k} | {_cell(v)} |")
    for png in plots_of(summary):
        lines += ["", f"Plot: [{Path(png).name}](file://{Path(png).resolve()})"]
    return "\n".join(lines)


def final_metrics(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The last value of every metric a training run logged, per split."""
    return store.query(
        "SELECT split, name AS metric, arg_max(value, step) AS value, max(step) AS step FROM metrics "
        "WHERE run_id = ? GROUP BY split, name ORDER BY split, name", [run_id])


def publish(stage: str, summary: dict[str, Any], seconds: float, store: Store) -> None:
    """Prefect artifacts for one stage (best effort: a stage never fails for its report)."""
    logger = get_run_logger()
    key = f"cai-{stage.replace('_', '-')}"
    try:
        if stage in TRAINING_STAGES and summary.get("run_id") and not plots_of(summary):
            from cai.plots import plot_training_curves

            out = Path(summary.get("path") or store.path.parent / "plots") / "training_curves.png"
            summary["plot"] = str(plot_training_curves(store, summary["run_id"], out,
                                                       title=f"{stage} {summary.get('model_id', '')}"))
        create_markdown_artifact(key=key, markdown=markdown_summary(stage, summary, seconds),
                                 description=f"cai {stage} summary")
        if stage in TRAINING_STAGES and summary.get("run_id"):
            rows = final_metrics(store, summary["run_id"])
            if rows:
                create_table_artifact(key=f"{key}-metrics", table=rows,
                                      description=f"cai {stage}: final metrics of run {summary['run_id']}")
        if stage == "evaluate" and summary.get("run_id"):
            rows = store.query("SELECT metric, value, subject_id, baseline_id, dataset FROM evaluations "
                               "WHERE run_id = ? ORDER BY metric", [summary["run_id"]])
            if rows:
                create_table_artifact(key=f"{key}-results", table=rows, description="cai evaluate: results")
    except Exception as e:  # noqa: BLE001 - reporting must not fail the stage
        logger.warning("could not publish artifacts for %s: %s", stage, e)


def retry_unless_config_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: a configuration error (bad setting, missing file or model) fails
    at once instead of three times; transient failures (a locked store, a crashed engine) are retried."""
    exc = state.data
    return not (isinstance(exc, StageFailed) and not exc.retryable)


@task(name="cai-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_config_error)
def stage_task(stage: str, cfg: PipelineConfig, produced: dict[str, str] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    store = Store(cfg.db) if cfg.db else Store()
    started = time.time()
    produced = dict(produced or {})
    try:
        summary = run_stage(stage, cfg, store, produced, progress=sys.stderr.isatty())
    except Exception as e:
        raise StageFailed(stage, e) from e
    seconds = time.time() - started
    logger.info("%s: %s", stage, json.dumps(summary, default=str))
    publish(stage, summary, seconds, store)
    return summary


@task(name="cai-shard", task_run_name="{shard.stage}-{shard.index}-of-{shard.count}", retries=2,
      retry_delay_seconds=2, cache_policy=NO_CACHE)
def shard_task(shard: Any) -> list[dict[str, Any]]:
    """One shard of a stage on a Ray worker: loads its engine once, returns rows (never opens the store)."""
    from cai.distributed import compute_shard

    return compute_shard(shard)


@flow(name="cai_sharded_stage", log_prints=True)
def sharded_stage(stage: str, cfg: PipelineConfig, produced: dict[str, str] | None = None) -> dict[str, Any]:
    """Fan a stage's shards out as concurrent tasks on the flow's task runner (a RayTaskRunner);
    write their rows here, in batches, as each shard finishes."""
    from prefect.futures import as_completed
    from prefect_ray.context import remote_options

    from cai.distributed import ShardWriter, plan_shards
    from cai.pipeline import stage_config

    logger = get_run_logger()
    store = Store(cfg.db) if cfg.db else Store()
    started = time.time()
    section = stage_config(stage, cfg, store, dict(produced or {}))
    whole, shards = plan_shards(stage, section, store, cfg.runner.shards)
    if not shards:
        return {**whole.summary, "written": 0, "seconds": round(time.time() - started, 2)}
    writer = ShardWriter(store, stage, section, whole, batch=cfg.runner.write_batch)
    try:
        with remote_options(**cfg.runner.remote_options()):
            futures = [shard_task.submit(s) for s in shards]
        for fut in as_completed(futures):
            n = writer.add(fut.result())
            logger.info("%s: a shard returned; %d rows written", stage, n)
    except BaseException as e:
        writer.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=repr(e))
        raise
    summary = writer.finish()
    summary.update(shards=len(shards), seconds=round(time.time() - started, 2))
    publish(stage, summary, summary["seconds"], store)
    return summary


def ray_stage(stage: str, cfg: PipelineConfig, produced: dict[str, str]) -> dict[str, Any]:
    from prefect_ray import RayTaskRunner

    from cai.distributed import default_ray_env

    r = cfg.runner
    init = {"runtime_env": {"env_vars": {**default_ray_env(), **_prefect_api_env()}}, **r.init_kwargs}
    address = None if r.address in (None, "auto") and not _ray_cluster_running() else r.address
    runner = RayTaskRunner(address=address, init_kwargs=init)
    return sharded_stage.with_options(task_runner=runner, flow_run_name=f"{stage}-x{r.shards}")(stage, cfg, produced)


def _prefect_api_env() -> dict[str, str]:
    """The driver's Prefect API for the shard tasks (otherwise each Ray worker would start an ephemeral
    server of its own). On a multi-node cluster use a Prefect server the nodes reach (PREFECT_API_URL)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {"PREFECT_API_URL": str(client.api_url).rstrip("/")}


def _ray_cluster_running() -> bool:
    """``address: auto`` joins a running cluster (RAY_ADDRESS or one started here), else starts one."""
    import os

    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import find_gcs_addresses

        return bool(find_gcs_addresses())
    except Exception:  # noqa: BLE001 - private API moved: let ray.init decide
        return True


def run_stages(cfg: PipelineConfig, stages: list[str]) -> dict[str, Any]:
    """Run stages in order inside the current flow, handing each training stage's model to the next.
    With ``runner: {kind: ray}`` the shardable stages fan out over a Ray cluster."""
    from cai.distributed import SHARDABLE

    results: dict[str, Any] = {}
    produced: dict[str, str] = {}
    for stage in stages:
        if cfg.runner.kind == "ray" and stage in SHARDABLE:
            try:
                results[stage] = ray_stage(stage, cfg, produced)
            except StageFailed:
                raise
            except Exception as e:
                raise StageFailed(stage, e) from e
            continue
        summary = stage_task(stage, cfg, produced)
        results[stage] = summary
        if stage in TRAINING_STAGES and isinstance(summary, dict) and summary.get("model_id"):
            produced[stage] = summary["model_id"]
    return results


@flow(name="cai_pipeline", log_prints=True)
def cai_pipeline(run_file: str = "pipeline.yaml", stages: list[str] | None = None,
                 allow_untrusted_code: bool = False) -> dict[str, Any]:
    """ingest → generate → critique → sft → label → train-rm → ppo/dpo → evaluate, as the run file says.
    ``allow_untrusted_code``: see ``guard_run_file`` (only a deployment's own parameter counts)."""
    cfg = load_pipeline(run_file)
    todo = [s for s in cfg.ordered_stages() if stages is None or s in stages]
    guard_run_file(cfg, run_file, todo, allow_untrusted_code)
    with store_writer_slot():
        return run_stages(cfg, todo)


# ---- run files that run code of their own (cai.trust) --------------------------------------------
def current_deployment_id() -> str | None:
    """The Prefect deployment this flow run belongs to; None for a plain call (`cai run`, tests)."""
    from prefect.runtime import deployment

    dep_id = deployment.id
    return str(dep_id) if dep_id else None


def deployment_allows_untrusted_code(deployment_id: str) -> bool:
    """Whether the deployment itself (what `cai deploy` registered from flows/prefect.yaml) sets
    ``allow_untrusted_code: true``. Read from the server, so a value passed for one flow run does not
    count; any error reading it counts as no (fail closed)."""
    from prefect.client.orchestration import get_client

    from cai.trust import ALLOW_PARAMETER

    try:
        with get_client(sync_client=True) as client:
            params = client.read_deployment(deployment_id).parameters or {}
    except Exception:  # noqa: BLE001 - unknown deployment, server unreachable: not allowed
        return False
    return params.get(ALLOW_PARAMETER) is True


def guard_run_file(cfg: PipelineConfig, run_file: str, stages: list[str], allow_untrusted_code: bool) -> None:
    """Inside a Prefect deployment, refuse a run file whose stages run code that is not cai's (a
    ``python:`` reward, ``trust_remote_code``, ...) unless the deployment allows it: the flow run's
    ``allow_untrusted_code`` is true and so is the deployment's own parameter. `cai run` is never refused."""
    from cai.trust import load_judge_specs, refuse_untrusted_code

    dep_id = current_deployment_id()
    if dep_id is None:
        return
    allowed = allow_untrusted_code and deployment_allows_untrusted_code(dep_id)
    refuse_untrusted_code(cfg, run_file, in_deployment=True, allowed=allowed, stages=stages,
                          judge_specs=load_judge_specs(cfg, stages), asked_per_run=allow_untrusted_code and not allowed)


def store_writer_slot():
    """Deployed runs (prefect.yaml sets CAI_STORE_WRITER_LIMIT) hold the global concurrency limit of
    the store's one writer for the whole run, so two deployments never write one store at once."""
    import os
    from contextlib import nullcontext

    name = os.environ.get("CAI_STORE_WRITER_LIMIT")
    if not name:
        return nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(name, occupy=1)


def run_pipeline(run_file: str | Path, stages: list[str] | None = None) -> dict[str, Any]:
    """Entry point for `cai run`: the flow, in Prefect's ephemeral mode unless a server is configured."""
    return cai_pipeline(run_file=str(run_file), stages=stages)


if __name__ == "__main__":
    print(json.dumps(run_pipeline(sys.argv[1] if len(sys.argv) > 1 else "pipeline.yaml"), indent=2, default=str))
