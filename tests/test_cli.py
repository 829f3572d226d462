"""The `cai` command as a user runs it: a real process, a real DuckDB file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import typer

CAI = str(Path(sys.executable).parent / "cai")


def cai(*args, db=None, check=True, **kw):
    env = {**os.environ, **({"CAI_DB": str(db)} if db else {})}
    out = subprocess.run([CAI, *map(str, args)], capture_output=True, text=True, env=env, **kw)
    if check:
        assert out.returncode == 0, out.stderr + out.stdout
    return out


def test_help_lists_commands():
    from cai.cli import app

    # Compare the registered command names (not substrings of the help text, which any word matches).
    names = {c.name for c in typer.main.get_command(app).commands.values()}
    for cmd in ["ingest", "generate", "sql", "db", "models", "constitution", "runs", "critique", "label", "sft",
                "train-rm", "ppo", "dpo", "evaluate", "run"]:
        assert cmd in names, sorted(names)
    out = cai("--help")
    assert out.returncode == 0 and "runs" in out.stdout


def test_ingest_sql_and_db_info(tmp_path, demo_prompt_files):
    db = tmp_path / "cai.duckdb"
    out = cai("ingest", *demo_prompt_files, db=db)
    assert "new" in out.stdout
    info = cai("db", "info", "--db", db).stdout
    from cai.schema import SCHEMA_VERSION

    assert f"schema version {SCHEMA_VERSION}" in info and "prompts" in info
    table = cai("sql", "select category, count(*) as n from prompts group by all order by 1", db=db).stdout
    assert "red_team" in table and "helpful" in table
    rows = json.loads("[" + ",".join(cai("sql", "select category from prompts limit 3", "-f", "json", db=db)
                                     .stdout.splitlines()) + "]")
    assert len(rows) == 3 and "category" in rows[0]
    csv_out = cai("sql", "select 1 as a, 'x' as b", "--format", "csv", db=db).stdout
    assert csv_out == "a,b\n1,x\n"  # plain \n line ends, not CRLF
    pq_file = tmp_path / "p.parquet"
    cai("sql", "select * from prompts", "--format", "parquet", "--out", pq_file, db=db)
    assert pq.read_table(pq_file).num_rows >= 200


def test_sql_is_read_only_and_errors_are_clear(tmp_path):
    db = tmp_path / "cai.duckdb"
    missing = cai("sql", "select 1", db=db, check=False)
    assert missing.returncode == 1 and "does not exist yet" in missing.stderr
    cai("db", "init", db=db)
    write = cai("sql", "delete from prompts", db=db, check=False)
    assert write.returncode == 1 and "read-only" in write.stderr.lower()
    bad = cai("sql", "select nope from prompts", db=db, check=False)
    assert bad.returncode == 1 and "nope" in bad.stderr


def test_ingest_bad_file_exit_code(tmp_path):
    db = tmp_path / "cai.duckdb"
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    out = cai("ingest", f, db=db, check=False)
    assert out.returncode == 1
    assert f"{f}:2: 'prompt' must be text" in out.stderr


def test_constitution_lint_and_schema(tmp_path):
    ok = cai("constitution", "lint", "constitutions/harmless.yaml", cwd=Path(__file__).parent.parent)
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n")
    out = cai("constitution", "lint", bad, check=False)
    assert out.returncode == 1 and f"{bad}:4: principles[0].judge: required field is missing" in out.stderr
    schema = tmp_path / "schema.json"
    cai("constitution", "schema", "--out", schema)
    assert json.loads(schema.read_text())["title"] == "cai constitution"


def test_generate_without_model_says_how_to_get_it(tmp_path, demo_prompt_files):
    db = tmp_path / "cai.duckdb"
    cai("ingest", demo_prompt_files[0], db=db)
    env_cache = {"CAI_MODELS_DIR": str(tmp_path / "nothing")}
    out = subprocess.run([CAI, "generate", "--limit", "1"], capture_output=True, text=True,
                         env={**os.environ, "CAI_DB": str(db), **env_cache})
    assert out.returncode == 1 and "cai models pull smollm2-135m-instruct" in out.stderr


def test_training_commands_share_config_file_and_set_handling(tmp_path):
    """sft, train-rm, ppo and dpo build their configs the same way: --config file, flags, --set;
    a bad value names the file and the field before anything is loaded."""
    db = tmp_path / "cai.duckdb"
    bad = tmp_path / "rm.yaml"
    bad.write_text("lr: -1\nbatch_size: 2\n")
    out = cai("train-rm", "--config", bad, db=db, check=False)
    assert out.returncode == 1 and str(bad) in out.stderr and "lr" in out.stderr
    out = cai("sft", "--set", "warmup_ratio=2", db=db, check=False)
    assert out.returncode == 1 and "warmup_ratio" in out.stderr
    out = cai("ppo", "--set", "minibatch_size=3", "--batch-size", "8", db=db, check=False)
    assert out.returncode == 1 and "multiple of minibatch_size" in out.stderr
    out = cai("dpo", "--config", tmp_path / "missing.yaml", db=db, check=False)
    assert out.returncode == 1 and "no such file" in out.stderr
    out = cai("sft", "--set", "no_such_field=1", db=db, check=False)
    assert out.returncode == 1 and "no_such_field" in out.stderr
