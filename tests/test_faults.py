"""Fault injection: kill a stage at a known point (the store's ``CAI_FAULT`` test hook), re-run it, and
compare the store with an uninterrupted run: no duplicates, no lost rows, identical rows, the killed run
marked (``stale`` after SIGKILL, ``interrupted`` after SIGTERM).

Covered: generate (SIGKILL), critique (SIGKILL), label (SIGTERM), ingest (SIGKILL after its single batch),
each killed after a batch drawn by a seeded random and compared row by row (less run_id / created_at) with
one shared uninterrupted run; the training stages sft, dpo, ppo (SIGKILL), train_rm (SIGTERM) and evaluate
(SIGKILL), each killed after a seeded random metrics (evaluate: comparisons) write and compared with an
uninterrupted run (see the section below); two `cai run`s on one store at once; a stage writing while
`cai sql` holds a long read-only query."""

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


# ---- the training stages (and evaluate) ------------------------------------------------------------
# One base store (SL-CAI pairs for sft; labelled comparisons for train_rm and dpo; their prompts for ppo and
# evaluate), copied per run. Each test: an uninterrupted run in-process, then on a fresh copy the stage's
# own command killed in a subprocess after a seeded random write (CAI_FAULT=metrics:K: trainers write
# their curves step by step), the same config re-run in-process, and the two stores compared. The kill
# lands after a committed metrics batch and before the next checkpoint save, so a trainer that resumes
# (sft, train_rm, ppo) replays the steps since its last checkpoint; dpo has no checkpoints and starts over.
# On CPU with one thread every trainer here is bit-deterministic on resume (the RNG state is in the
# checkpoint, each step's data order and sampling seed depend on the step alone), so the finished run's
# curve must equal the uninterrupted run's at every step it logged (timings aside) and the saved weights
# must be equal tensors.

TIMING = ("seconds", "per_second")


def _set_args(cfg) -> list[str]:
    """The stage config as `--set KEY=JSON` flags (every command takes them): the killed command runs the
    config of the in-process runs exactly."""
    return [a for k, v in cfg.model_dump(mode="json", exclude_defaults=True).items()
            for a in ("--set", f"{k}={json.dumps(v)}")]


def _curve(store: Store, run_id: str) -> dict[tuple, float]:
    """(step, split, metric) -> value of one run, timings left out; asserts one row per key."""
    rows = store.query("SELECT step, split, metric, value FROM training_curves WHERE run_id = ?", [run_id])
    keys = [(r["step"], r["split"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), f"duplicate training_curves rows in {run_id}"
    return {k: r["value"] for k, r in zip(keys, rows, strict=True) if not any(t in k[2] for t in TIMING)}


def _same_curve(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert got.keys() <= want.keys() and got, (sorted(got), sorted(want))
    for k, v in got.items():
        assert (v is None and want[k] is None) or v == pytest.approx(want[k], abs=tol, rel=tol), (k, v, want[k])


def _same_weights(a: str | Path, b: str | Path) -> None:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _one_model_one_ok_run(store: Store, stage: str, model_id: str) -> dict:
    assert store.scalar("SELECT count(*) FROM models WHERE model_id = ?", [model_id]) == 1
    (ok,) = store.query("SELECT * FROM runs WHERE stage = ? AND status = 'ok'", [stage])
    assert store.scalar("SELECT count(*) FROM runs WHERE status = 'running'") == 0
    return ok


@pytest.fixture(scope="module")
def train_base(tmp_path_factory) -> Path:
    from test_dpo import POLITE, RUDE, add_pairs
    from test_sft import add_sl_pairs

    root = tmp_path_factory.mktemp("train")
    store = Store(root / "base" / "cai.duckdb")
    store.init()
    add_sl_pairs(store, root, rounds=1)
    questions = ["How do I boil an egg?", "What is a prime number?", "Explain rain.", "How do plants grow?",
                 "What is DNS?", "Why is the sky blue?", "How do magnets work?", "What is a list in Python?"]
    pairs = [(q, POLITE[i % 3], RUDE[i % 3], 0.9, "train") if i % 2 else (q, RUDE[i % 3], POLITE[i % 3], 0.2, "train")
             for i, q in enumerate(questions)]
    pairs += [("What is an atom?", POLITE[0], RUDE[1], 0.85, "test"), ("How do birds fly?", RUDE[2], POLITE[1], 0.1,
                                                                       "test")]
    add_pairs(store, pairs)
    return store.path


def _fault_run(stage_args: list[str], base: Path, where: Path, fault: str) -> Store:
    db = _copy(base, where)
    t0 = time.time()
    killed = _cai(stage_args, db, fault=fault)
    print(f"killed {stage_args[0]} after {time.time() - t0:.1f} s")  # shown with -s: where the time goes
    assert killed.returncode != 0, killed.stdout[-2000:]
    return Store(db)


def _env_one_thread(monkeypatch) -> None:
    # the killed subprocess and the in-process runs compute with the same thread count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


@pytest.fixture
def one_torch_thread(monkeypatch):
    import torch

    _env_one_thread(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sft_killed_midway_resumes_from_its_checkpoint_to_the_uninterrupted_model(
        tmp_path, tiny_policy_dir, train_base, one_torch_thread):
    from cai.sft import SFTConfig, run_sft

    cfg = SFTConfig(base_model=str(tiny_policy_dir), max_steps=6, batch_size=2, lr=1e-2, warmup_ratio=0.0,
                    val_fraction=0.0, save_every=2, log_every=1, max_length=64)
    ref = run_sft(Store(_copy(train_base, tmp_path / "ref")), cfg, progress=False)
    k = random.Random("sft").randint(3, 5)  # after step k's metrics (past the step-2 checkpoint)
    store = _fault_run(["sft", *_set_args(cfg)], train_base, tmp_path / "fault", f"metrics:{k}")
    assert store.scalar("SELECT max(step) FROM metrics") == k
    done = run_sft(store, cfg, progress=False)  # the re-run, in-process
    assert done["model_id"] == ref["model_id"]
    assert done.get("resumed_from_step", 0) == 2 * ((k - 1) // 2)  # the last checkpoint before the kill
    assert _statuses(store, "sft") == ["stale", "ok"]
    ok = _one_model_one_ok_run(store, "sft", done["model_id"])
    _same_curve(_curve(store, ok["run_id"]), _curve(Store(tmp_path / "ref" / "cai.duckdb"), ref["run_id"]))
    _same_weights(done["path"], ref["path"])


def test_train_rm_stopped_by_sigterm_resumes_from_its_checkpoint_to_the_uninterrupted_model(
        tmp_path, tiny_reward_dir, train_base, one_torch_thread):
    from cai.reward import RewardConfig, train_reward

    cfg = RewardConfig(base_model=str(tiny_reward_dir), max_steps=6, batch_size=2, lr=2e-3, warmup_ratio=0.0,
                       val_fraction=0.0, save_every=2, log_every=1, max_length=64)
    ref = train_reward(Store(_copy(train_base, tmp_path / "ref")), cfg, progress=False)
    k = random.Random("train_rm").randint(3, 5)  # past the first checkpoint (step 2)
    store = _fault_run(["train-rm", *_set_args(cfg)], train_base, tmp_path / "fault", f"metrics:{k}:SIGTERM")
    done = train_reward(store, cfg, progress=False)
    assert done["model_id"] == ref["model_id"] and done.get("resumed_from_step", 0) == 2 * ((k - 1) // 2)
    assert _statuses(store, "train_rm") == ["interrupted", "ok"]  # SIGTERM: the run closed itself
    ok = _one_model_one_ok_run(store, "train_rm", done["model_id"])
    _same_curve(_curve(store, ok["run_id"]), _curve(Store(tmp_path / "ref" / "cai.duckdb"), ref["run_id"]))
    _same_weights(done["path"], ref["path"])
    assert done["offset"] == ref["offset"]


def test_dpo_killed_midway_starts_over_to_the_uninterrupted_model(tmp_path, tiny_policy_dir, train_base,
                                                                   one_torch_thread):
    from cai.dpo import DPOConfig, run_dpo

    cfg = DPOConfig(policy=str(tiny_policy_dir), epochs=2, batch_size=4, micro_batch_size=2, learning_rate=5e-3,
                    eval_every=2, max_prompt_tokens=32, max_response_tokens=16)
    ref = run_dpo(Store(_copy(train_base, tmp_path / "ref")), cfg, progress=False, plot=False)
    writes = 1 + ref["steps"] + ref["steps"] // cfg.eval_every  # eval at 0, every step, evals, (final eval last)
    k = random.Random("dpo").randint(1, writes - 1)
    store = _fault_run(["dpo", *_set_args(cfg)], train_base, tmp_path / "fault", f"metrics:{k}")
    assert not (tmp_path / "fault" / "models" / ref["model_id"]).exists()  # no half-written model folder
    done = run_dpo(store, cfg, progress=False, plot=False)  # no checkpoints: the re-run starts over
    assert done["model_id"] == ref["model_id"]
    assert _statuses(store, "dpo") == ["stale", "ok"]
    ok = _one_model_one_ok_run(store, "dpo", done["model_id"])
    ref_curve = _curve(Store(tmp_path / "ref" / "cai.duckdb"), ref["run_id"])
    got = _curve(store, ok["run_id"])
    assert got.keys() == ref_curve.keys()
    _same_curve(got, ref_curve)
    _same_weights(done["path"], ref["path"])


def test_ppo_killed_midway_resumes_its_run_from_the_checkpoint_to_the_uninterrupted_policy(
        tmp_path, tiny_policy_dir, train_base, one_torch_thread):
    from cai import runs
    from cai.ppo import PPOConfig, run_ppo

    cfg = PPOConfig(policy=str(tiny_policy_dir), reward="python:cai.ppo:reward_brevity", steps=4, batch_size=4,
                    minibatch_size=2, ppo_epochs=1, max_new_tokens=4, temperature=1.0, eval_split=None,
                    save_every=2, learning_rate=1e-3, num_samples=2, sample_every=1)
    ref = run_ppo(Store(_copy(train_base, tmp_path / "ref")), cfg, progress=False, plot=False)
    # After step k-1's metrics (one write per step), past the first checkpoint (saved after step 1):
    # killed before any checkpoint, a trainer simply starts over (the dpo test shows that case).
    k = random.Random("ppo").randint(3, cfg.steps)
    store = _fault_run(["ppo", *_set_args(cfg)], train_base, tmp_path / "fault", f"metrics:{k}")
    (killed,) = store.query("SELECT run_id, status FROM runs WHERE stage = 'ppo'")
    assert killed["status"] == "running" and runs.reap_stale(store) == 1  # `cai runs` marks it
    assert _statuses(store, "ppo") == ["stale"]
    done = run_ppo(store, cfg, progress=False, plot=False)
    # PPO resumes the killed run itself (same run id, from its last checkpoint; the rows it logged after
    # that checkpoint are dropped and redone), so the one run ends 'ok' with the resume point recorded.
    assert done["model_id"] == ref["model_id"] and done["run_id"] == killed["run_id"]
    assert done["resumed_from_step"] == 2
    assert _statuses(store, "ppo") == ["ok"]
    ok = _one_model_one_ok_run(store, "ppo", done["model_id"])
    assert json.loads(ok["summary"])["resumed_from_step"] == done["resumed_from_step"]
    ref_store = Store(tmp_path / "ref" / "cai.duckdb")
    got, want = _curve(store, ok["run_id"]), _curve(ref_store, ref["run_id"])
    assert got.keys() == want.keys()
    _same_curve(got, want)
    samples = "SELECT step, split, response, reward FROM samples WHERE run_id = ? ORDER BY step, split, response"
    assert store.query(samples, [ok["run_id"]]) == ref_store.query(samples, [ref["run_id"]])
    _same_weights(done["path"], ref["path"])


def test_evaluate_killed_midway_resumes_to_the_uninterrupted_evaluation(
        tmp_path, tiny_policy_dir, train_base, one_torch_thread):
    from cai.evaluate import EvaluateConfig, run_evaluate
    from cai.testing import build_tiny_model

    other = build_tiny_model(tmp_path / "baseline", "policy", seed=3)
    cfg = EvaluateConfig(policy=str(tiny_policy_dir), baseline=str(other),
                         judge=str(_judge(tmp_path, tiny_policy_dir)), max_tokens=4, temperature=1.0, batch_size=1, kl_samples=0,
                         constitution=str(REPO / "constitutions" / "harmless.yaml"))
    ref_store = Store(_copy(train_base, tmp_path / "ref"))
    ref = run_evaluate(ref_store, cfg, plot=False)
    assert ref["prompts"] == 2
    # batch_size 1: four generation writes (two prompts, policy then baseline), then the judge's
    before = Store(train_base).scalar("SELECT count(*) FROM generations")
    assert ref_store.scalar("SELECT count(*) FROM generations") == before + 4
    k = random.Random("evaluate").randint(1, 4)
    store = _fault_run(["evaluate", "--no-plot", *_set_args(cfg)], train_base, tmp_path / "fault",
                       f"generations:{k}")
    assert store.scalar("SELECT count(*) FROM generations") == before + k
    done = run_evaluate(store, cfg, plot=False)
    assert _statuses(store, "evaluate") == ["stale", "ok"]
    assert done["metrics"] == ref["metrics"]
    for table, key in (("evaluations", "evaluation_id"), ("comparisons", "comparison_id"),
                       ("generations", "generation_id")):
        got, want = _rows(store, table, key), _rows(ref_store, table, key)
        assert got.keys() == want.keys(), table
        for rows in (got, want):  # JSON columns name the run that wrote the row (details.run_id, ...)
            for r in rows.values():
                for c in ("details", "params"):
                    if isinstance(r.get(c), str) and r[c].startswith("{"):
                        r[c] = {n: v for n, v in json.loads(r[c]).items() if not n.endswith("run_id")}
        diff = {(i, c): (got[i][c], want[i][c]) for i in got for c in got[i] if got[i][c] != want[i][c]}
        assert not diff, (table, list(diff.items())[:5])
