"""Prefect flows over the cai stages.

Each stage is a Prefect task that calls the same function the CLI calls (``cai.pipeline.run_stage``).
Stages are idempotent against the store, so Prefect's retries (and a re-run after a crash, even
``kill -9``) continue where the work stopped and write nothing twice. Tasks run in the flow's own
process, so a model loaded by one stage (``cai.engines.get_engine``) is reused by the next.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from cai.pipeline import PipelineConfig, load_pipeline, run_stage
from cai.store import Store


def _markdown_summary(stage: str, summary: dict[str, Any], seconds: float) -> str:
    lines = [f"# {stage}", "", f"Finished in {seconds:.1f} s.", "", "| key | value |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, dict | list):
            v = json.dumps(v, default=str)
        lines.append(f"| {k} | {v} |")
    for png in summary.get("plots", []) if isinstance(summary.get("plots"), list) else []:
        lines += ["", f"Plot: [{Path(png).name}](file://{Path(png).resolve()})"]
    return "\n".join(lines)


@task(name="cai-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=[5, 30])
def stage_task(stage: str, cfg: PipelineConfig) -> dict[str, Any]:
    logger = get_run_logger()
    store = Store(cfg.db) if cfg.db else Store()
    started = time.time()
    summary = run_stage(stage, cfg, store)
    seconds = time.time() - started
    logger.info("%s: %s", stage, json.dumps(summary, default=str))
    create_markdown_artifact(key=f"cai-{stage.replace('_', '-')}", markdown=_markdown_summary(stage, summary, seconds),
                             description=f"cai {stage} summary")
    return summary


@flow(name="cai_pipeline", log_prints=True)
def cai_pipeline(run_file: str = "pipeline.yaml", stages: list[str] | None = None) -> dict[str, Any]:
    """ingest → generate → critique → sft → label → train-rm → ppo/dpo → evaluate, as the run file says."""
    cfg = load_pipeline(run_file)
    todo = [s for s in cfg.ordered_stages() if stages is None or s in stages]
    results: dict[str, Any] = {}
    for stage in todo:
        results[stage] = stage_task(stage, cfg)
    return results


def run_pipeline(run_file: str | Path, stages: list[str] | None = None) -> dict[str, Any]:
    """Entry point for `cai run`: the flow, in Prefect's ephemeral mode unless a server is configured."""
    return cai_pipeline(run_file=str(run_file), stages=stages)


if __name__ == "__main__":
    import sys

    print(json.dumps(run_pipeline(sys.argv[1] if len(sys.argv) > 1 else "pipeline.yaml"), indent=2, default=str))
