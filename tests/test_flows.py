"""Prefect for real: the pipeline flow in ephemeral mode, and a served deployment on a real
`prefect server start` whose scheduler runs it."""

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cai.pipeline import load_pipeline
from cai.yamlio import SpecError

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def prefect_env(home: Path, **extra) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "PREFECT_LOGGING_LEVEL": "WARNING", **extra}
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def write_run_file(tmp_path: Path, tiny_policy_dir: Path, stages=("ingest", "generate"), **over) -> Path:
    spec = {
        "name": "test", "db": str(tmp_path / "cai.duckdb"), "policy": str(tiny_policy_dir),
        "engine": "transformers", "stages": list(stages),
        "ingest": {"files": [str(REPO / "data/prompts/helpful.jsonl")]},
        "generate": {"max_tokens": 6, "limit": 4, "batch_size": 4},
        **over,
    }
    f = tmp_path / "pipeline.yaml"
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    return f


def test_run_file_errors_name_line_and_field(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: x\nengine: tpu\nstages: [ingest, fly]\ngenerate:\n  n: 0\n  colour: red\n"
                 "ingest:\n  files: [nope.jsonl]\n")
    with pytest.raises(SpecError) as e:
        load_pipeline(f)
    found = {(p.line, p.field) for p in e.value.problems}
    assert (2, "engine") in found
    assert (3, "stages[1]") in found
    assert (5, "generate.n") in found
    assert (6, "generate.colour") in found
    f.write_text("name: x\nstages: [ingest]\ningest:\n  files: [nope.jsonl]\n")
    with pytest.raises(SpecError, match=r"p.yaml:4: ingest.files\[0\]: no such file"):
        load_pipeline(f)


def test_stage_sections_inherit_top_level(tmp_path, tiny_policy_dir):
    cfg = load_pipeline(write_run_file(tmp_path, tiny_policy_dir, seed=9))
    assert cfg.generate.model == str(tiny_policy_dir) and cfg.generate.engine == "transformers"
    assert cfg.generate.seed == 9


def test_pipeline_flow_runs_in_ephemeral_mode_with_artifacts(tmp_path, tiny_policy_dir):
    run_file = write_run_file(tmp_path, tiny_policy_dir)
    home = tmp_path / "prefect"
    out = subprocess.run([BIN / "cai", "run", run_file], env=prefect_env(home), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from cai.store import Store

    store = Store(tmp_path / "cai.duckdb")
    assert store.scalar("select count(*) from prompts") >= 100
    assert store.scalar("select count(*) from generations") == 4
    # A second run is a no-op on the store (idempotent stages).
    out = subprocess.run([BIN / "cai", "run", run_file], env=prefect_env(home), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert store.scalar("select count(*) from generations") == 4
    assert store.scalar("select count(*) from prompts") == store.scalar("select count(distinct prompt_id) from prompts")
    # Each stage published a markdown artifact into Prefect's own database.
    con = sqlite3.connect(home / "prefect.db")
    keys = {k for (k,) in con.execute("select key from artifact")}
    assert {"cai-ingest", "cai-generate"} <= keys
    (md,) = con.execute("select data from artifact where key = 'cai-generate' order by created desc limit 1").fetchone()
    assert "# generate" in md and "| generated |" in md


def test_failing_stage_is_one_line_and_a_config_error_is_not_retried(tmp_path, tiny_policy_dir):
    # A reward module that does not exist: a configuration error, found when the ppo stage starts.
    run_file = write_run_file(tmp_path, tiny_policy_dir, stages=("ppo",),
                              ppo={"reward": "python:no_such_module_xyz:fn", "steps": 1, "batch_size": 2,
                                   "minibatch_size": 2, "samples_per_prompt": 1})
    home = tmp_path / "prefect"
    out = subprocess.run([BIN / "cai", "run", run_file], env=prefect_env(home), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "stage 'ppo' failed: ValueError:" in errors[0] and "no_such_module_xyz" in errors[0], errors[0]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    # Prefect ran the task once: no retries for an error a retry cannot fix.
    con = sqlite3.connect(home / "prefect.db")
    rows = con.execute("select run_count, state_type from task_run where name like 'ppo%'").fetchall()
    assert rows == [(1, "FAILED")], rows
    from cai.store import Store

    db = tmp_path / "cai.duckdb"
    assert not db.exists() or Store(db).scalar("select count(*) from models") == 0  # nothing registered


def test_retry_condition_retries_transient_errors_only():
    from types import SimpleNamespace

    from cai.pipeline import StageFailed
    from cai.store import StoreLockedError
    from flows.pipeline import retry_unless_config_error

    def retried(exc: BaseException) -> bool:
        return retry_unless_config_error(None, None, SimpleNamespace(data=exc))

    assert not retried(StageFailed("label", FileNotFoundError("judges/x.yaml")))
    assert not retried(StageFailed("ppo", ValueError("reward 'python:x:y': cannot import module 'x'")))
    assert not retried(StageFailed("generate", LookupError("no prompts")))
    assert retried(StageFailed("generate", StoreLockedError("the store is locked")))
    assert retried(StageFailed("generate", ConnectionError("reset by peer")))
    assert retried(RuntimeError("not a stage error"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_deployment_runs_on_schedule(tmp_path, tiny_policy_dir):
    run_file = write_run_file(tmp_path, tiny_policy_dir, stages=("ingest",))
    port = free_port()
    env = prefect_env(tmp_path / "prefect", PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
                      PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PREFECT_RUNNER_POLL_FREQUENCY="2")
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    served = None
    try:
        import httpx

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("prefect server did not come up in 180 s")
        served = subprocess.Popen([BIN / "cai", "serve", "cai_pipeline", "--run-file", str(run_file),
                                   "--interval", "5", "--name", "test-every-5s"], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        from cai.store import Store

        store = Store(tmp_path / "cai.duckdb")
        deadline = time.time() + 240
        while time.time() < deadline:
            if store.path.exists() and store.scalar("select count(*) from runs where stage = 'ingest' and status = 'ok'"):
                break
            assert served.poll() is None, served.stdout.read()
            time.sleep(2)
        else:
            pytest.fail("the scheduled run never wrote to the store")
        assert store.scalar("select count(*) from prompts") >= 100
        # The run is visible in Prefect as a completed run of the served deployment.
        deadline = time.time() + 60
        while time.time() < deadline:
            runs = httpx.post(f"http://127.0.0.1:{port}/api/flow_runs/filter",
                              json={"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}).json()
            if runs:
                break
            time.sleep(2)
        assert runs and runs[0]["deployment_id"]
    finally:
        for proc in (served, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(10)
