"""Run files that run code of their own (python: rewards, trust_remote_code): allowed with `cai run`,
refused in a Prefect deployment unless the deployment allows it (cai.trust, flows/pipeline.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from cai.pipeline import load_pipeline
from cai.trust import UntrustedCodeError, find_untrusted_code, load_judge_specs, refuse_untrusted_code

REPO = Path(__file__).resolve().parent.parent


def run_file(tmp_path: Path, **spec) -> Path:
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"db": str(tmp_path / "cai.duckdb"), "stages": ["generate", "label", "ppo"],
                                 **spec}, sort_keys=False))
    return f


def fields(cfg, stages=None, specs=None) -> set[str]:
    return {u.field for u in find_untrusted_code(cfg, stages, specs)}


def test_python_rewards_outside_cai_are_found(tmp_path):
    cfg = load_pipeline(run_file(tmp_path, ppo={"reward": "python:my_rewards:score"}))
    (use,) = find_untrusted_code(cfg)
    assert (use.field, use.value) == ("ppo.reward", "python:my_rewards:score") and "Python function" in use.why
    assert fields(load_pipeline(run_file(tmp_path, ppo={"reward": "python:rewards/mine.py:score"}))) == {"ppo.reward"}
    # cai's own reward functions, reward models and judges run no code from the run file
    for reward in ("python:cai.ppo:reward_brevity", "rm-0123", "judge:multiple-choice"):
        assert fields(load_pipeline(run_file(tmp_path, ppo={"reward": reward}))) == set(), reward
    # only the stages that will run count
    assert fields(load_pipeline(run_file(tmp_path, ppo={"reward": "python:m:f"})), ["generate", "label"]) == set()


def test_engine_options_that_load_code_are_found(tmp_path):
    # top level: reported once under its own name, though every stage inherits it
    cfg = load_pipeline(run_file(tmp_path, engine_options={"trust_remote_code": True}))
    assert fields(cfg) == {"engine_options.trust_remote_code"}
    cfg = load_pipeline(run_file(tmp_path, engine_options={"trust_remote_code": "false"},
                                 label={"engine_options": {"worker_extension_cls": "pkg.Ext"}},
                                 generate={"engine_options": {"trust_remote_code": "yes", "max_model_len": 512}}))
    assert fields(cfg) == {"label.engine_options.worker_extension_cls", "generate.engine_options.trust_remote_code"}
    assert fields(load_pipeline(run_file(tmp_path, engine_options={"max_model_len": 512}))) == set()
    # a judge spec the stages name counts too
    spec = yaml.safe_load((REPO / "judges/multiple-choice.yaml").read_text())
    spec["engine_options"] = {"trust_remote_code": True}
    judge = tmp_path / "judge.yaml"
    judge.write_text(yaml.safe_dump(spec))
    cfg = load_pipeline(run_file(tmp_path, label={"judge": str(judge)}))
    assert fields(cfg, specs=load_judge_specs(cfg, cfg.ordered_stages())) == {
        f"judge spec {judge}.engine_options.trust_remote_code"}


def test_refused_only_in_a_deployment_that_does_not_allow_it(tmp_path):
    f = run_file(tmp_path, ppo={"reward": "python:my_rewards:score"}, engine_options={"trust_remote_code": True})
    cfg = load_pipeline(f)
    assert len(refuse_untrusted_code(cfg, str(f), in_deployment=False, allowed=False)) == 2  # cai run
    assert len(refuse_untrusted_code(cfg, str(f), in_deployment=True, allowed=True)) == 2
    with pytest.raises(UntrustedCodeError) as e:
        refuse_untrusted_code(cfg, str(f), in_deployment=True, allowed=False)
    msg = str(e.value)
    assert msg.startswith(f"{f}: refused in a Prefect deployment")
    assert "ppo.reward: python:my_rewards:score" in msg and "engine_options.trust_remote_code" in msg
    assert "allow_untrusted_code: true" in msg and "flows/prefect.yaml" in msg and f"cai run {f}" in msg
    clean = load_pipeline(run_file(tmp_path))
    assert refuse_untrusted_code(clean, "run.yaml", in_deployment=True, allowed=False) == []


def test_deployed_flow_run_refuses_before_writing(tmp_path, monkeypatch):
    """The real flow, its deployment id given the way Prefect documents for tests (the
    PREFECT__RUNTIME__DEPLOYMENT__ID variable that prefect.runtime.deployment reads first). A flow-run
    parameter alone does not allow it: the deployment, read from the server, must (this one does not exist)."""
    from flows.pipeline import cai_pipeline

    f = run_file(tmp_path, stages=["ingest", "generate"], engine_options={"trust_remote_code": True},
                 ingest={"files": [str(REPO / "data/prompts/helpful.jsonl")]})
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", str(uuid.uuid4()))
    with pytest.raises(UntrustedCodeError, match="engine_options.trust_remote_code") as e:
        cai_pipeline(run_file=str(f))
    assert "per-run" not in str(e.value) and not (tmp_path / "cai.duckdb").exists()
    with pytest.raises(UntrustedCodeError, match="a value given for one flow run does not count"):
        cai_pipeline(run_file=str(f), allow_untrusted_code=True)
    assert not (tmp_path / "cai.duckdb").exists()


def test_run_check_notes_code_but_allows_it(tmp_path, tiny_policy_dir):
    from typer.testing import CliRunner

    from cai.cli import app

    f = run_file(tmp_path, stages=["generate"], policy=str(tiny_policy_dir), engine="transformers",
                 generate={})
    ok = CliRunner().invoke(app, ["run", str(f), "--check"])
    assert ok.exit_code == 0 and "note:" not in ok.output, ok.output
    f = run_file(tmp_path, stages=["generate", "ppo"], policy=str(tiny_policy_dir), engine="transformers",
                 ppo={"reward": "python:my_rewards:score"})
    noted = CliRunner().invoke(app, ["run", str(f), "--check"])
    assert noted.exit_code == 0, noted.output
    assert "ppo.reward: python:my_rewards:score" in noted.output and "allow_untrusted_code: true" in noted.output
