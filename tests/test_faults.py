"""Fault injection: kill a stage at a known point (the store's ``CAI_FAULT`` test hook), re-run it, and
compare the store with an uninterrupted run: no duplicates, no lost rows, identical rows, the killed run
marked (``stale`` after SIGKILL, ``interrupted`` after SIGTERM).

Covered so far: generate (SIGKILL and SIGTERM). The other stages share the run helper and the hook, but
have no fault test yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.generate import GenerateConfig, run_generate
from cai.ingest import ingest_file
from cai.store import Store

CAI = str(Path(sys.executable).parent / "cai")
REPO = Path(__file__).resolve().parent.parent
ARGS = ["--max-tokens", "4", "--batch-size", "2", "--limit", "6"]


def _texts(store: Store) -> dict[str, str]:
    return {r["generation_id"]: r["text"] for r in store.query("SELECT generation_id, text FROM generations")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_policy_dir, demo_prompt_files) -> dict[str, str]:
    """One uninterrupted run, shared by every fault in this module."""
    store = Store(tmp_path_factory.mktemp("ref") / "cai.duckdb")
    ingest_file(store, demo_prompt_files[0])
    run_generate(store, GenerateConfig(model=str(tiny_policy_dir), max_tokens=4, batch_size=2, limit=6),
                 progress=False)
    texts = _texts(store)
    assert len(texts) == 6
    return texts


@pytest.mark.parametrize(("signal_name", "killed_status"), [("SIGKILL", "stale"), ("SIGTERM", "interrupted")])
def test_generate_killed_midway_resumes_to_the_uninterrupted_result(
        tmp_path, tiny_policy_dir, demo_prompt_files, reference, signal_name, killed_status):
    db = tmp_path / "cai.duckdb"
    ingest_file(Store(db), demo_prompt_files[0])
    env = {**os.environ, "CAI_DB": str(db), "PYTHONPATH": str(REPO)}
    cmd = [CAI, "generate", "--model", str(tiny_policy_dir), *ARGS]
    killed = subprocess.run(cmd, env={**env, "CAI_FAULT": f"generations:2:{signal_name}"}, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode != 0, killed.stdout
    store = Store(db)
    assert store.scalar("SELECT count(*) FROM generations") == 4  # two committed batches of two, then the kill

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert _texts(store) == reference  # no lost rows, no extra rows, identical text
    assert store.scalar("SELECT count(*) - count(DISTINCT generation_id) FROM generations") == 0
    statuses = [r["status"] for r in store.query(
        "SELECT status FROM runs WHERE stage = 'generate' ORDER BY started_at")]
    assert statuses == [killed_status, "ok"]
