"""Runs that say the truth: ok / failed / interrupted (SIGTERM) / stale (SIGKILL), shown by `cai runs`
and `cai db info`; a bad input writes no run row; secrets never reach runs.params."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from cai import runs
from cai.cli import app
from cai.store import Store, now

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process that opens a run through the shared helper and then waits to be killed.
CHILD = """
import sys, time
from cai.store import Store
s = Store(sys.argv[1])
with s.run("child", {"k": 1}) as r:
    print(r["run_id"], flush=True)
    time.sleep(60)
"""


def _child(db) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, text=True, env=env)
    run_id = p.stdout.readline().strip()
    assert run_id.startswith("child-"), run_id
    return p, run_id


def _status(store: Store, run_id: str) -> dict:
    (r,) = store.query("SELECT status, error, host, pid, heartbeat_at FROM runs WHERE run_id = ?", [run_id])
    return r


def test_run_records_owner_and_ends_ok_or_failed(store):
    with store.run("t", {"x": 1}) as r:
        r["summary"] = {"rows": 2}
    row = _status(store, r["run_id"])
    assert row["status"] == "ok" and row["pid"] == os.getpid() and row["host"] == runs.host()
    assert row["heartbeat_at"] is not None
    with pytest.raises(ValueError), store.run("t", {}) as r2:
        raise ValueError("boom")
    row = _status(store, r2["run_id"])
    assert row["status"] == "failed" and "boom" in row["error"]
    assert runs._open == {}


def test_sigterm_marks_interrupted(store):
    p, run_id = _child(store.path)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) != 0
    assert _status(store, run_id)["status"] == "interrupted"


def test_sigkill_is_marked_stale_by_the_next_command(store):
    p, run_id = _child(store.path)
    p.kill()
    p.wait(30)
    assert _status(store, run_id)["status"] == "running"  # nobody could say otherwise yet
    res = CliRunner().invoke(app, ["runs", "--db", str(store.path)])
    assert res.exit_code == 0, res.output
    assert "marked 1 run(s) stale" in res.output and run_id in res.output
    row = _status(store, run_id)
    assert row["status"] == "stale" and f"process {p.pid}" in row["error"]
    res = CliRunner().invoke(app, ["db", "info", "--db", str(store.path)])
    assert "1 stale" in res.output


def test_silent_heartbeat_on_another_host_is_stale_and_live_runs_are_not(store):
    old = now() - timedelta(seconds=runs.STALE_AFTER_SECONDS + 60)
    store.insert("runs", [
        {"run_id": "far", "stage": "x", "status": "running", "started_at": old, "host": "elsewhere", "pid": 1,
         "heartbeat_at": old},
        {"run_id": "alive", "stage": "x", "status": "running", "started_at": old, "host": runs.host(),
         "pid": os.getpid(), "heartbeat_at": now()},
    ])
    assert runs.reap_stale(store) == 1
    assert _status(store, "far")["status"] == "stale" and "no heartbeat" in _status(store, "far")["error"]
    assert _status(store, "alive")["status"] == "running"


def test_heartbeat_advances(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "HEARTBEAT_SECONDS", 0.05)
    runs._stop.set()
    if runs._thread is not None:
        runs._thread.join(5)
    s = Store(tmp_path / "c.duckdb")
    run_id = s.start_run("t", {})
    first = _status(s, run_id)["heartbeat_at"]
    deadline = time.monotonic() + 10
    while _status(s, run_id)["heartbeat_at"] == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(s, run_id)["heartbeat_at"] > first
    s.finish_run(run_id)


def test_secrets_in_params_are_redacted(store):
    run_id = store.start_run("t", {"engine_options": {"base_url": "https://me:hunter2@host/v1", "api_key": "sk-1"},
                                   "max_tokens": 5})
    store.finish_run(run_id)
    (p,) = store.query("SELECT params FROM runs WHERE run_id = ?", [run_id])
    params = json.loads(p["params"])
    assert "hunter2" not in p["params"] and "sk-1" not in p["params"]
    assert params["engine_options"] == {"base_url": "https://***@host/v1", "api_key": "***"}
    assert params["max_tokens"] == 5


def test_generate_without_base_url_writes_nothing(tmp_path, demo_prompt_files):
    db = tmp_path / "c.duckdb"
    r = CliRunner()
    assert r.invoke(app, ["ingest", str(demo_prompt_files[0]), "--db", str(db)]).exit_code == 0
    before = Store(db).query("SELECT count(*) AS n FROM runs")[0]["n"]
    res = r.invoke(app, ["generate", "--engine", "openai", "--db", str(db), "--limit", "1"])
    assert res.exit_code == 1
    assert "engine 'openai' needs --base-url" in res.output and "Traceback" not in res.output
    s = Store(db)
    assert s.query("SELECT count(*) AS n FROM runs")[0]["n"] == before
    assert s.query("SELECT count(*) AS n FROM models")[0]["n"] == 0
