"""The bad-input table: each row is a command, a bad input and the one-line message it must print.

Every row runs in-process (typer's CliRunner) against a fresh store folder and checks: a non-zero exit,
exactly one `error:` line naming the cause, no traceback, and nothing written (no new store file, no
run row, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.store import Store

REPO = Path(__file__).resolve().parent.parent

# (id, argv with {db}, {repo} and {runs} (run files) placeholders, expected substring of the one error line, needs an ingested db)
TABLE = [
    ("generate-openai-no-base-url", ["generate", "--engine", "openai", "--limit", "1", "--db", "{db}"],
     "engine 'openai' needs --base-url", True),
    ("generate-unknown-engine", ["generate", "--engine", "nope", "--db", "{db}"], "--engine: Input should be", True),
    ("sft-set-bad-yaml", ["sft", "--db", "{db}", "--set", "lr=[1,"], "is not valid YAML", False),
    ("sft-set-no-equals", ["sft", "--db", "{db}", "--set", "lr"], "use KEY=VALUE", False),
    ("sft-model-id-dotdot", ["sft", "--db", "{db}", "--set", "model_id=../../etc"], "not a usable model id", False),
    ("train-rm-model-id-slash", ["train-rm", "--db", "{db}", "--set", "model_id=/tmp/x"], "not a usable model id",
     False),
    ("sft-config-missing", ["sft", "--db", "{db}", "--config", "{db}.missing.yaml"], "no such file", False),
    ("constitution-lint-directory", ["constitution", "lint", "{repo}/constitutions"], "is a directory", False),
    ("run-unknown-stage", ["run", "{repo}/flows/demo.yaml", "--stages", "generate,nope", "--check"],
     "'nope' is not among", False),
    ("ppo-target-kl-negative", ["ppo", "--db", "{db}", "--reward", "python:cai.ppo:reward_brevity",
                                "--target-kl", "-1"], "target_kl: Input should be greater than 0", False),
    ("ppo-python-reward-missing-module", ["ppo", "--db", "{db}", "--reward", "python:missing_mod_xyz:fn"],
     "cannot import module 'missing_mod_xyz'", True),
    ("ppo-python-reward-missing-function", ["ppo", "--db", "{db}", "--reward", "python:cai.ppo:no_such_fn"],
     "has no function 'no_such_fn'", True),
    ("ppo-python-reward-missing-file", ["ppo", "--db", "{db}", "--reward", "python:{db}.nope.py:fn"],
     "no such file", True),
    ("ppo-hub-id-offline", ["ppo", "--db", "{db}", "--policy", "nobody-xyz/no-such-model", "--reward",
                            "python:cai.ppo:reward_brevity"], "cai models pull", True),
    ("generate-hub-id-offline", ["generate", "--db", "{db}", "--model", "nobody-xyz/no-such-model", "--limit", "1"],
     "not in the local Hugging Face cache", True),
    ("run-check-bad-constitution", ["run", "{runs}/bad-constitution.yaml", "--check"],
     "critique.constitution: no constitution 'no-such-constitution'", False),
    ("run-check-bad-judge", ["run", "{runs}/bad-judge.yaml", "--check"], "label.judge:", False),
    ("run-check-missing-model", ["run", "{runs}/missing-model.yaml", "--check"],
     "generate.model: unknown model '/nonexistent/model-folder'", False),
    ("run-check-unwritable-store", ["run", "{runs}/unwritable.yaml", "--check"], "is not writable", False),
    ("db-info-missing-db", ["db", "info", "--db", "{db}"], "does not exist yet", False),
    ("sql-missing-db", ["sql", "select 1", "--db", "{db}"], "does not exist yet", False),
    ("runs-missing-db", ["runs", "--db", "{db}"], "does not exist yet", False),
]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("bad") / "base.duckdb"
    res = CliRunner().invoke(app, ["ingest", str(REPO / "data" / "prompts" / "red_team.jsonl"), "--db", str(db)])
    assert res.exit_code == 0, res.output
    return db


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Run files that load (valid YAML, known fields) but need something that is not there."""
    d = tmp_path_factory.mktemp("runs")
    (d / "a-file").write_text("not a folder")
    files = {
        "bad-constitution": "constitution: no-such-constitution\nstages: [critique]\n",
        "bad-judge": f"db: {d}/cai.duckdb\njudge: {d}/a-file\nstages: [label]\n",
        "missing-model": f"db: {d}/cai.duckdb\npolicy: /nonexistent/model-folder\nstages: [generate]\n",
        "unwritable": f"db: {d}/a-file/sub/cai.duckdb\nstages: [generate]\n",
    }
    for name, text in files.items():
        (d / f"{name}.yaml").write_text(text)
    return d


def _counts(db: Path) -> dict[str, int]:
    s = Store(db)
    return {t: s.scalar(f"SELECT count(*) FROM {t}") for t in ("runs", "models", "generations")}


@pytest.mark.parametrize(("argv", "message", "needs_db"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_bad_input_is_one_clear_line(tmp_path, ingested, runs, monkeypatch, argv, message, needs_db):
    from cai.models import _hub_reachable

    # Hub ids must fail the same way on a machine with network: pretend to be offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_reachable.cache_clear()
    db = tmp_path / "cai.duckdb"
    if needs_db:
        db.write_bytes(ingested.read_bytes())
        before = _counts(db)
    args = [a.format(db=db, repo=REPO, runs=runs) for a in argv]
    res = CliRunner().invoke(app, args)
    out = res.output
    assert res.exit_code not in (0, None), out
    assert "Traceback" not in out, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out
    if needs_db:
        assert _counts(db) == before
    else:
        assert not db.exists(), "a rejected command created a store"
