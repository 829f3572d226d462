"""`cai serve` and `cai deploy`: the usual Prefect commands for people who don't know them.

- ``serve``: one long-running process that registers a deployment of a flow with a schedule and
  runs its scheduled runs itself (``Flow.serve``). Needs a Prefect server (``prefect server start``,
  or Prefect Cloud) configured through ``PREFECT_API_URL``.
- ``deploy``: registers every deployment of ``flows/prefect.yaml`` on a process work pool (created
  if missing); a ``prefect worker start --pool cai-process`` then runs them on schedule.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

FLOWS_DIR = Path(__file__).resolve().parent
PREFECT_FILE = FLOWS_DIR / "prefect.yaml"
WORK_POOL = "cai-process"
GPU_WORK_POOL = "cai-gpu"
STORE_WRITER_LIMIT = "cai-store-writer"

# name -> "module:function"
FLOWS: dict[str, str] = {
    "cai_pipeline": "flows.pipeline:cai_pipeline",
    "label_new_prompts": "flows.scheduled:label_new_prompts",
    "retrain_reward_model": "flows.scheduled:retrain_reward_model",
    "evaluate_policy": "flows.scheduled:evaluate_policy",
    "relabel_changed": "flows.versions:relabel_changed",
    "audit_constitution": "flows.versions:audit_constitution",
}


def load_flow(name: str) -> Any:
    if name not in FLOWS:
        raise KeyError(f"unknown flow {name!r}; choose one of: {', '.join(FLOWS)}")
    module, attr = FLOWS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise RuntimeError(
            "no Prefect server configured: start one with `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (or log in to Prefect Cloud)"
        )
    return url


def serve(flow_name: str, *, deployment: str | None = None, cron: str | None = None,
          interval: float | None = None, parameters: dict[str, Any] | None = None, limit: int | None = None) -> None:
    """Register a scheduled deployment of ``flow_name`` and run its runs in this process (blocks)."""
    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron or interval")
    require_server()
    flow = load_flow(flow_name)
    flow.serve(name=deployment or f"{flow_name}-served", cron=cron, interval=interval,
               parameters=parameters or {}, limit=limit, print_starting_message=True)


def deploy(prefect_file: Path = PREFECT_FILE, *, names: list[str] | None = None) -> int:
    """Create the process work pool if needed and register the deployments in ``prefect_file``."""
    require_server()
    prefect = [sys.executable, "-m", "prefect"]
    env = {**os.environ}
    for pool in (WORK_POOL, GPU_WORK_POOL):  # CPU work, and GPU work (training, the full pipeline)
        pools = subprocess.run([*prefect, "work-pool", "inspect", pool], capture_output=True, text=True, env=env)
        if pools.returncode != 0:
            subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process"], check=True, env=env)
    # One writer per store across deployments: every deployed flow run holds this slot (see prefect.yaml).
    subprocess.run([*prefect, "gcl", "create", STORE_WRITER_LIMIT, "--limit", "1"], capture_output=True, env=env)
    cmd = [*prefect, "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    if names:
        for n in names:
            cmd += ["--name", n]
    else:
        cmd.append("--all")
    return subprocess.run(cmd, cwd=prefect_file.parent.parent, env=env).returncode
