"""Fault injection: kill a stage at a known point (the store's ``CAI_FAULT`` test hook), re-run it, and
compare the store with an uninterrupted run: no duplicates, no lost rows, identical rows, the killed run
marked (``stale`` after SIGKILL, ``interrupted`` after SIGTERM).

Covered: generate (SIGKILL), critique (SIGKILL), label (SIGTERM), ingest (SIGKILL after its single batch),
each killed after a batch drawn by a seeded random and compared row by row (less run_id / created_at) with
one shared uninterrupted run; two `cai run`s on one store at once; a stage writing while `cai sql` holds a
long read-only query. The trainers' kill-and-resume tests live in test_sft.py, test_reward.py and
test_pipeline.py (see the note above the critique test)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cai.critique import CritiqueConfig, run_critique
from cai.generate import GenerateConfig, run_generate
from cai.ingest import ingest_file
from cai.label import LabelConfig, run_label
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


def test_generate_killed_midway_resumes_to_the_uninterrupted_result(
        tmp_path, tiny_policy_dir, demo_prompt_files, reference):
    # SIGKILL here; SIGTERM is the label test's (one process start each, to keep the file fast).
    signal_name, killed_status = "SIGKILL", "stale"
    db = tmp_path / "cai.duckdb"
    ingest_file(Store(db), demo_prompt_files[0])
    env = {**os.environ, "CAI_DB": str(db), "PYTHONPATH": str(REPO)}
    cmd = [CAI, "generate", "--model", str(tiny_policy_dir), *ARGS]
    killed = subprocess.run(cmd, env={**env, "CAI_FAULT": f"generations:2:{signal_name}"}, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode != 0, killed.stdout
    store = Store(db)
    assert store.scalar("SELECT count(*) FROM generations") == 4  # two committed batches of two, then the kill

    # The re-run in-process (as `cai generate` would call it): saves a process start.
    run_generate(store, GenerateConfig(model=str(tiny_policy_dir), max_tokens=4, batch_size=2, limit=6),
                 progress=False)
    assert _texts(store) == reference  # no lost rows, no extra rows, identical text
    assert store.scalar("SELECT count(*) - count(DISTINCT generation_id) FROM generations") == 0
    statuses = [r["status"] for r in store.query(
        "SELECT status FROM runs WHERE stage = 'generate' ORDER BY started_at")]
    assert statuses == [killed_status, "ok"]


# ---- critique, label, ingest ----------------------------------------------------------------------
# One shared base store (prompts + two samples per prompt), copied per test; one uninterrupted
# reference run per stage on a copy. Small batches so each stage writes several, and the kill point
# is drawn by a seeded random among them. The trainers' kill-and-resume is covered where they live:
# tests/test_sft.py::test_resumed_training_matches_an_uninterrupted_run,
# tests/test_reward.py::test_resume_gives_bit_identical_weights and
# tests/test_pipeline.py::test_cai_run_killed_with_sigkill_resumes_without_duplicates (a real SIGKILL).

GEN = {"n": 2, "max_tokens": 4, "batch_size": 3, "limit": 3, "seed": 0}
CRITIQUE_ARGS = ["--rounds", "1", "--critique-max-tokens", "4", "--revision-max-tokens", "4", "--max-growth", "1000",
                 "--batch-size", "2", "--temperature", "1.0"]
LABEL_ARGS = ["--pairs", "two_samples,initial_vs_revised", "--batch-size", "2"]


def _critique_cfg(model: Path) -> CritiqueConfig:
    """The in-process twin of CRITIQUE_ARGS."""
    return CritiqueConfig(model=str(model), rounds=1, critique_max_tokens=4, revision_max_tokens=4,
                          max_growth=1000, batch_size=2, temperature=1.0)


def _label_cfg(judge: Path) -> LabelConfig:
    """The in-process twin of LABEL_ARGS."""
    return LabelConfig(judge=str(judge), pairs=["two_samples", "initial_vs_revised"], batch_size=2)


# Columns that say when and by which run a row was written, not what it is.
WHEN = ("run_id", "created_at")


def _rows(store: Store, table: str, key: str) -> dict[str, dict]:
    cols = [r["column_name"] for r in store.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table]) if r["column_name"] not in WHEN]
    rows = store.query(f"SELECT {', '.join(cols)} FROM {table}")
    assert len(rows) == len({r[key] for r in rows}), f"duplicate {key} in {table}"
    return {r[key]: {c: round(v, 6) if isinstance(v, float) else v for c, v in r.items()} for r in rows}


def _copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst_dir / src.name)
    return dst_dir / src.name


def _judge(folder: Path, model: Path) -> Path:
    """The shipped multiple-choice judge on a tiny model (improbable-options check off: a random model
    puts ~2e-5 on each option)."""
    text = (REPO / "judges" / "multiple-choice.yaml").read_text()
    text = text.replace("model: smollm2-135m-instruct", f"model: {model}").replace("min_option_prob: 0.01",
                                                                                    "min_option_prob: 0")
    (folder / "judge.yaml").write_text(text)
    return folder / "judge.yaml"


def _cai(args: list[str], db: Path, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAI_DB": str(db), "PYTHONPATH": str(REPO)}
    env.pop("CAI_FAULT", None)
    if fault:
        env["CAI_FAULT"] = fault
    return subprocess.run([CAI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _kill_point(batches: int) -> int:
    """Which committed batch the kill follows: seeded, never the last (the run must have work left)."""
    return random.Random(15).randint(1, batches - 1)


def _statuses(store: Store, stage: str) -> list[str]:
    return [r["status"] for r in store.query(f"SELECT status FROM runs WHERE stage = '{stage}' ORDER BY started_at")]


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_policy_dir, demo_prompt_files) -> dict[str, Path]:
    """Store files after each stage, each made once by an uninterrupted run: ``generated`` (the base the
    fault tests start from), ``critiqued`` and ``labelled`` (the references)."""
    root = tmp_path_factory.mktemp("stages")
    store = Store(root / "generated" / "cai.duckdb")
    ingest_file(store, demo_prompt_files[0])
    run_generate(store, GenerateConfig(model=str(tiny_policy_dir), **GEN), progress=False)
    assert store.scalar("SELECT count(*) FROM generations") == 6
    out = {"generated": store.path, "judge": _judge(root, tiny_policy_dir)}
    crit = _copy(store.path, root / "critiqued")
    # References in-process (the options of CRITIQUE_ARGS / LABEL_ARGS): saves a process start each.
    run_critique(Store(crit), _critique_cfg(tiny_policy_dir), progress=False)
    assert Store(crit).scalar("SELECT count(*) FROM revisions") == 6
    lab = _copy(crit, root / "labelled")
    run_label(Store(lab), _label_cfg(out["judge"]), progress=False)
    assert Store(lab).scalar("SELECT count(*) FROM comparisons") >= 3
    return {**out, "critiqued": crit, "labelled": lab}


def test_critique_killed_at_a_random_batch_resumes_to_the_uninterrupted_result(tmp_path, tiny_policy_dir, stages):
    db = _copy(stages["generated"], tmp_path)
    args = ["critique", "--model", str(tiny_policy_dir), *CRITIQUE_ARGS]
    k = _kill_point(3)  # 6 generations, 2 per batch
    killed = _cai(args, db, fault=f"revisions:{k}")
    assert killed.returncode != 0, killed.stdout
    store = Store(db)
    assert store.scalar("SELECT count(*) FROM revisions") == 2 * k
    run_critique(store, _critique_cfg(tiny_policy_dir), progress=False)  # the re-run, in-process
    assert _rows(store, "revisions", "revision_id") == _rows(Store(stages["critiqued"]), "revisions", "revision_id")
    assert _statuses(store, "critique") == ["stale", "ok"]


def test_label_killed_at_a_random_batch_resumes_to_the_uninterrupted_result(tmp_path, stages):
    db = _copy(stages["critiqued"], tmp_path)
    ref = _rows(Store(stages["labelled"]), "comparisons", "comparison_id")
    args = ["label", "--judge", str(stages["judge"]), *LABEL_ARGS]
    k = _kill_point((len(ref) + 1) // 2)
    killed = _cai(args, db, fault=f"comparisons:{k}:SIGTERM")
    assert killed.returncode != 0, killed.stdout
    store = Store(db)
    assert store.scalar("SELECT count(*) FROM comparisons") == 2 * k
    run_label(store, _label_cfg(stages["judge"]), progress=False)  # the re-run, in-process
    assert _rows(store, "comparisons", "comparison_id") == ref
    assert _statuses(store, "label") == ["interrupted", "ok"]


def test_ingest_killed_after_its_write_is_marked_and_a_rerun_adds_nothing(tmp_path, demo_prompt_files, stages):
    # ingest writes a file's prompts in one batch: the kill lands after the commit, before the run closes.
    db = tmp_path / "cai.duckdb"
    killed = _cai(["ingest", str(demo_prompt_files[0])], db, fault="prompts:1")
    assert killed.returncode != 0, killed.stdout
    store = Store(db)
    assert ingest_file(store, demo_prompt_files[0]).inserted == 0  # the re-run, in-process
    assert _rows(store, "prompts", "prompt_id") == _rows(Store(stages["generated"]), "prompts", "prompt_id")
    assert _statuses(store, "ingest") == ["stale", "ok"]
    assert json.loads(store.query("SELECT summary FROM runs WHERE status = 'ok'")[0]["summary"])["inserted"] == 0


# ---- two writers, and a reader holding the file ------------------------------------------------------

def test_two_cai_runs_on_one_store_at_once_leave_one_clean_result(tmp_path, tiny_policy_dir, demo_prompt_files):
    db = tmp_path / "cai.duckdb"
    spec = {"name": "twice", "db": str(db), "policy": str(tiny_policy_dir), "engine": "transformers", "seed": 0,
            "stages": ["ingest", "generate"], "ingest": {"files": [str(demo_prompt_files[0])]},
            "generate": {k: v for k, v in GEN.items() if k != "seed"}}
    run_file = tmp_path / "pipeline.yaml"
    run_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING",
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    env.pop("CAI_FAULT", None)
    procs = [subprocess.Popen([CAI, "run", str(run_file)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    failed = [(p.returncode, err) for p, (_, err) in zip(procs, outs, strict=True) if p.returncode != 0]
    # Both finish, or one fails cleanly: a one-line error, no traceback.
    assert len(failed) <= 1, outs
    for _, err in failed:
        assert err.startswith("error:") and "Traceback" not in err, err[-3000:]
        again = subprocess.run([CAI, "run", str(run_file)], env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=400)
        assert again.returncode == 0, again.stderr[-3000:]
    store = Store(db)
    ref = Store(tmp_path / "ref.duckdb")
    ingest_file(ref, demo_prompt_files[0])
    run_generate(ref, GenerateConfig(model=str(tiny_policy_dir), **GEN), progress=False)
    assert _rows(store, "prompts", "prompt_id") == _rows(ref, "prompts", "prompt_id")
    # Two runs split the prompts between them, so engine batches differ from the reference run's; padding
    # moves the last bits of a log-prob (see test_sharding), so sampled rows are compared by what made them.
    made = ("prompt_id", "stage", "model_id", "sample_index", "seed", "params_hash")
    got, want = _rows(store, "generations", "generation_id"), _rows(ref, "generations", "generation_id")
    assert got.keys() == want.keys()
    assert {k: [r[c] for c in made] for k, r in got.items()} == {k: [r[c] for c in made] for k, r in want.items()}
    assert store.scalar("SELECT count(*) FROM runs WHERE status = 'running'") == 0


def _wait_until_open(proc: subprocess.Popen, db: Path) -> None:
    """Until ``proc`` holds ``db`` open (its /proc fds), so the writer starts while the query runs."""
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if any(os.path.realpath(f) == str(db.resolve()) for f in Path(f"/proc/{proc.pid}/fd").iterdir()):
                return
        except OSError:  # an fd closed while we looked
            pass
        time.sleep(0.05)
    pytest.fail(f"cai sql did not open {db} within 60 s")


SLOW_QUERY = "SELECT count(*) AS n FROM range(20000) a, range(20000) b WHERE (a.range * 7 + b.range) % 13 = 5"


def test_a_stage_writing_while_cai_sql_holds_a_long_query_waits_or_fails_cleanly_then_resumes(
        tmp_path, demo_prompt_files, stages):
    db = _copy(stages["generated"], tmp_path)
    env = {**os.environ, "CAI_DB": str(db), "PYTHONPATH": str(REPO)}
    env.pop("CAI_FAULT", None)
    sql = subprocess.Popen([CAI, "sql", SLOW_QUERY, "--format", "csv"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_open(sql, db)
        writer = _cai(["ingest", str(demo_prompt_files[1])], db)
        out, err = sql.communicate(timeout=300)
    finally:
        if sql.poll() is None:
            sql.kill()
    assert sql.returncode == 0 and out.splitlines()[-1].isdigit(), err[-2000:]
    if writer.returncode != 0:  # gave up waiting: one clean line, nothing written, then a re-run completes
        assert writer.stderr.startswith("error:") and "locked" in writer.stderr, writer.stderr[-3000:]
        assert "Traceback" not in writer.stderr
        writer = _cai(["ingest", str(demo_prompt_files[1])], db)
    assert writer.returncode == 0, writer.stderr[-3000:]
    ref = Store(_copy(stages["generated"], tmp_path / "ref"))
    ingest_file(ref, demo_prompt_files[1])
    store = Store(db)
    assert _rows(store, "prompts", "prompt_id") == _rows(ref, "prompts", "prompt_id")
    assert store.scalar("SELECT count(*) FROM runs WHERE status = 'running'") == 0
