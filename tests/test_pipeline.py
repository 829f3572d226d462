"""The whole pipeline on tiny models: every stage, the models handed from stage to stage, the lineage
in the store, idempotent re-runs, and a `cai run` killed with SIGKILL that resumes without duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cai.pipeline import load_pipeline, run_stage
from cai.store import Store
from cai.yamlio import SpecError

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TABLES = ("prompts", "generations", "revisions", "comparisons", "models", "metrics", "evaluations")


def tiny_judge(tmp_path: Path, model: Path) -> Path:
    """The shipped multiple-choice judge on a tiny model; a random model puts ~2e-5 on each option,
    so the improbable-options check is off."""
    text = (REPO / "judges" / "multiple-choice.yaml").read_text()
    text = text.replace("model: smollm2-135m-instruct", f"model: {model}")
    text = text.replace("min_option_prob: 0.01", "min_option_prob: 0")
    out = tmp_path / "judge.yaml"
    out.write_text(text)
    return out


def tiny_run_file(tmp_path: Path, policy: Path, stages: list[str], **over) -> Path:
    spec = {
        "name": "tiny", "db": str(tmp_path / "cai.duckdb"), "policy": str(policy), "engine": "transformers",
        "judge": str(tiny_judge(tmp_path, policy)), "seed": 3, "stages": stages,
        "ingest": {"files": [str(REPO / "data/prompts/red_team.jsonl"), str(REPO / "data/prompts/helpful.jsonl")],
                   "test_fraction": 0.1},
        "generate": {"split": "train", "limit": 6, "n": 2, "max_tokens": 16, "temperature": 1.0},
        "critique": {"rounds": 1, "critique_max_tokens": 12, "revision_max_tokens": 16, "max_growth": None,
                     "temperature": 1.0},
        "sft": {"max_steps": 2, "batch_size": 2, "max_length": 256, "val_fraction": 0.0},
        "train_rm": {"max_steps": 2, "batch_size": 2, "max_length": 256, "val_fraction": 0.2},
        "ppo": {"steps": 2, "batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6,
                "eval_prompts": 2, "limit": 8, "threads": 1},
        "evaluate": {"limit": 4, "max_tokens": 8},
        **over,
    }
    f = tmp_path / "pipeline.yaml"
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    return f


def counts(store: Store) -> dict[str, int]:
    return {t: store.scalar(f"select count(*) from {t}") for t in TABLES}


def test_sections_are_validated_with_lines_before_anything_runs(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("stages: [ppo, dpo]\nppo:\n  steps: 0\n  batch_size: 4\nlabel:\n  pairs: [nonsense]\n"
                 "train_rm:\n  lr: fast\n")
    with pytest.raises(SpecError) as e:
        load_pipeline(f)
    found = {(p.line, p.field) for p in e.value.problems}
    assert (3, "ppo.steps") in found
    assert (6, "label.pairs[0]") in found
    assert (8, "train_rm.lr") in found
    f.write_text("stages: [ppo, dpo]\n")
    with pytest.raises(SpecError, match="p.yaml:1: stages: list ppo or dpo"):
        load_pipeline(f)


def test_sections_inherit_and_keep_what_they_set(tmp_path, tiny_policy_dir):
    f = tiny_run_file(tmp_path, tiny_policy_dir, ["ingest"], critique={"rounds": 1, "model": "other-model"})
    cfg = load_pipeline(f)
    assert cfg.critique.model == "other-model" and cfg.critique.seed == 3
    assert cfg.sft.base_model == str(tiny_policy_dir) and cfg.train_rm.base_model == str(tiny_policy_dir)
    assert cfg.ppo.policy == str(tiny_policy_dir) and cfg.label.engine == "transformers"
    assert "model" in cfg.explicit["critique"] and "policy" not in cfg.explicit["ppo"]


def test_every_stage_on_tiny_models_hands_models_on_and_reruns_write_nothing(tmp_path, brief_policy_dir):
    stages = ["ingest", "generate", "critique", "sft", "label", "train_rm", "ppo", "evaluate"]
    cfg = load_pipeline(tiny_run_file(tmp_path, brief_policy_dir, stages))
    store = Store(cfg.db)
    produced: dict[str, str] = {}
    summaries = {s: run_stage(s, cfg, store, produced) for s in stages}
    assert set(produced) == {"sft", "train_rm", "ppo"}
    assert all(counts(store)[t] > 0 for t in TABLES), counts(store)

    # Lineage: PPO started from the SFT model and was rewarded by the reward model trained here;
    # the reward model's data are comparisons of a judge spec under the constitution.
    ppo = store.query("select * from models where model_id = ?", [produced["ppo"]])[0]
    assert ppo["parent_ids"][0] == produced["sft"] and ppo["parent_ids"][1] == produced["train_rm"]
    sft = store.query("select * from models where model_id = ?", [produced["sft"]])[0]
    assert sft["base_model_id"] in {r["model_id"] for r in store.query("select model_id from models where kind='base'")}
    (spec_hash, const_hash) = store.query(
        "select distinct judge_spec_hash, constitution_hash from comparisons")[0].values()
    assert store.scalar("select count(*) from constitutions where constitution_hash = ?", [const_hash]) == 1
    assert spec_hash
    assert store.scalar("select count(*) from evaluations where kind = 'policy' and subject_id = ?",
                        [produced["ppo"]]) > 0
    assert summaries["evaluate"].get("report")

    # A second pass over every stage finds everything done and writes no row.
    before = counts(store)
    produced2: dict[str, str] = {}
    for s in stages:
        run_stage(s, cfg, store, produced2)
    assert produced2 == produced
    after = counts(store)
    assert {t: after[t] for t in TABLES if t not in ("metrics",)} == {t: before[t] for t in TABLES if t != "metrics"}


def test_stage_left_out_of_a_run_hands_over_its_newest_model(tmp_path, brief_policy_dir):
    stages = ["ingest", "generate", "label", "train_rm", "ppo"]
    cfg = load_pipeline(tiny_run_file(tmp_path, brief_policy_dir, stages))
    store = Store(cfg.db)
    produced: dict[str, str] = {}
    for s in ["ingest", "generate", "label", "train_rm"]:
        run_stage(s, cfg, store, produced)
    # A later run of only ppo (e.g. `cai run --stages ppo`) finds the reward model in the store.
    later: dict[str, str] = {}
    summary = run_stage("ppo", cfg, store, later)
    row = store.query("select parent_ids from models where model_id = ?", [summary["model_id"]])[0]
    assert row["parent_ids"][1] == produced["train_rm"]


def test_cai_run_killed_with_sigkill_resumes_without_duplicates(tmp_path, tiny_policy_dir):
    run_file = tiny_run_file(tmp_path, tiny_policy_dir, ["ingest", "generate"],
                             generate={"limit": 60, "n": 2, "max_tokens": 24, "batch_size": 2, "temperature": 1.0})
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    store = Store(tmp_path / "cai.duckdb")
    proc = subprocess.Popen([BIN / "cai", "run", str(run_file)], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if store.path.exists() and (store.scalar("select count(*) from generations") or 0) >= 10:
                break
            assert proc.poll() is None, "cai run ended before it could be interrupted"
            time.sleep(0.5)
        else:
            pytest.fail("no generations were written within 300 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    partial = store.scalar("select count(*) from generations")
    assert 10 <= partial < 120
    assert store.scalar("select count(*) from runs where stage = 'generate' and status = 'running'") == 1

    out = subprocess.run([BIN / "cai", "run", str(run_file)], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert store.scalar("select count(*) from generations") == 120
    assert store.scalar("select count(distinct (prompt_id, sample_index)) from generations") == 120
    # The resumed run generated only what was missing.
    last = store.query("select summary from runs where stage = 'generate' and status = 'ok' "
                       "order by started_at desc limit 1")[0]
    import json

    assert json.loads(last["summary"])["generated"] == 120 - partial
