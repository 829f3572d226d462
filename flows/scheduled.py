"""Smaller flows people schedule on their own (see flows/prefect.yaml).

They reuse the pipeline's run file and stage functions. Because every stage fills only what is
missing from the store, "label new prompts" is simply ingest → generate → critique → label: old
prompts already have their generations, revisions and comparisons, so only new ones get work.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from cai.pipeline import load_pipeline
from flows.pipeline import guard_run_file, run_stages, store_writer_slot


def _run(run_file: str, stages: list[str], allow_untrusted_code: bool) -> dict[str, Any]:
    cfg = load_pipeline(run_file)
    guard_run_file(cfg, run_file, stages, allow_untrusted_code)  # deployed runs: no code from the run file
    with store_writer_slot():
        return run_stages(cfg, stages)


@flow(name="label_new_prompts", log_prints=True)
def label_new_prompts(run_file: str = "flows/demo.yaml", allow_untrusted_code: bool = False) -> dict[str, Any]:
    """Ingest the run file's prompt files, then generate, critique and label whatever is new."""
    return _run(run_file, ["ingest", "generate", "critique", "label"], allow_untrusted_code)


@flow(name="retrain_reward_model", log_prints=True)
def retrain_reward_model(run_file: str = "flows/demo.yaml", allow_untrusted_code: bool = False) -> dict[str, Any]:
    """Train a reward model on every comparison in the store."""
    return _run(run_file, ["train_rm"], allow_untrusted_code)


@flow(name="evaluate_policy", log_prints=True)
def evaluate_policy(run_file: str = "flows/demo.yaml", allow_untrusted_code: bool = False) -> dict[str, Any]:
    """Evaluate the newest policy against its parent on held-out prompts."""
    return _run(run_file, ["evaluate"], allow_untrusted_code)
