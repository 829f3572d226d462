import shutil
import subprocess
from pathlib import Path

import duckdb
import pytest

from cai.schema import MIGRATIONS, SCHEMA_VERSION
from cai.store import Store, content_hash, migrate


def test_creates_and_migrates_versioned_schema(tmp_path):
    s = Store(tmp_path / "x" / "cai.duckdb")
    s.init()
    info = s.info()
    assert info["schema_version"] == SCHEMA_VERSION
    names = {t["name"]: t["type"] for t in info["tables"]}
    for table in ["runs", "constitutions", "principles", "prompts", "generations", "revisions",
                  "comparisons", "models", "metrics", "evaluations"]:
        assert names[table] == "table"
    for view in ["preferences", "sl_cai", "judge_quality", "training_curves"]:
        assert names[view] == "view"
    # Migrating again is a no-op.
    con = duckdb.connect(str(s.path))
    assert migrate(con) == SCHEMA_VERSION
    assert con.execute("select count(*) from schema_version").fetchall()[0][0] == len(MIGRATIONS)
    con.close()


def test_refuses_a_newer_schema(tmp_path):
    s = Store(tmp_path / "cai.duckdb")
    s.init()
    con = duckdb.connect(str(s.path))
    con.execute("insert into schema_version values (999, now())")
    con.close()
    with pytest.raises(RuntimeError, match="newer than this cai"):
        Store(s.path).init()


def test_inserts_are_idempotent(store):
    row = {"prompt_id": "p1", "messages": '[{"role": "user", "content": "hi"}]', "prompt_text": "hi",
           "tags": ["a", "b"]}
    assert store.insert("prompts", [row]) == 1
    assert store.insert("prompts", [row, {**row, "prompt_id": "p2"}]) == 1
    assert store.scalar("select count(*) from prompts") == 2
    assert store.existing_ids("prompts", "prompt_id", ["p1", "zz"]) == {"p1"}
    assert store.query("select tags from prompts where prompt_id = 'p1'") == [{"tags": ["a", "b"]}]


def test_failed_batch_writes_nothing(store):
    with pytest.raises(KeyError), store.write() as con:
        con.execute("insert into prompts (prompt_id, messages) values ('ok', '[]')")
        store.insert("prompts", [{"prompt_id": "x", "no_such_column": 1}], con=con)
    assert store.scalar("select count(*) from prompts") == 0


def test_content_hash_is_stable():
    assert content_hash({"b": 1, "a": 2}) == content_hash({"a": 2, "b": 1})
    assert content_hash("x") != content_hash("y")
    assert len(content_hash("x")) == 16


def test_runs_are_recorded(store):
    run = store.start_run("test", {"k": 1})
    store.finish_run(run, "ok", {"rows": 3})
    (r,) = store.query("select stage, status, params, summary from runs")
    assert r["stage"] == "test" and r["status"] == "ok" and '"rows": 3' in r["summary"]


def test_reader_waits_for_writer_lock(tmp_path):
    """A second process holding the write lock briefly: the reader retries and gets in afterwards."""
    import sys

    s = Store(tmp_path / "cai.duckdb")
    s.init()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, time, sys; con = duckdb.connect(sys.argv[1]); print('locked', flush=True);"
        "time.sleep(2); con.close()"), str(s.path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    reader = Store(s.path, lock_timeout=20)
    reader._migrated = True
    assert reader.scalar("select max(version) from schema_version") == SCHEMA_VERSION
    holder.wait(10)
    quick = Store(s.path, lock_timeout=0.3)
    quick._migrated = True
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, time, sys; con = duckdb.connect(sys.argv[1]); print('locked', flush=True);"
        "time.sleep(3); con.close()"), str(s.path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    from cai.store import StoreLockedError

    with pytest.raises(StoreLockedError, match="stayed locked"):
        quick.scalar("select 1")
    holder.wait(10)


def test_file_readable_by_duckdb_1_5_cli(store):
    cli = shutil.which("duckdb") or str(Path(__import__("sys").executable).parent / "duckdb")
    if not Path(cli).exists():
        pytest.fail("the duckdb 1.5 CLI (pip package duckdb-cli==1.5.6, in the dev extra) is missing")
    version = subprocess.run([cli, "--version"], capture_output=True, text=True).stdout
    assert version.startswith("v1.5"), version
    store.insert("prompts", [{"prompt_id": "p1", "messages": "[]", "prompt_text": "hello", "tags": ["t"]}])
    out = subprocess.run([cli, "-readonly", "-csv", str(store.path), "select prompt_text, tags from prompts"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "hello" in out.stdout
