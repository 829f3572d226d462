"""`cai sft/train-rm/dpo/ppo --num-processes 2`: two processes under a real `accelerate launch` (gloo on CPU) with the
same global batch follow one process's loss curve; rank 0 alone writes; its checkpoint resumes in
one process. Tiny model, real DuckDB."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sft import add_sl_pairs, weights

from cai.reward import RewardConfig, train_reward
from cai.sft import SFTConfig, run_sft

CAI = str(Path(sys.executable).parent / "cai")
# Two processes sum the same per-example gradients in another order (float32): curves agree to
# ~1e-6; 1e-4 relative leaves room across CPUs and BLAS builds, far below one step's change.
RTOL = 1e-4
KW = {"lr": 1e-2, "min_lr_ratio": 1.0, "max_steps": 4, "batch_size": 2, "grad_accum": 2, "val_fraction": 0.0,
      "warmup_ratio": 0.0, "log_every": 1, "save_every": 100}
# stage: (command, config class, trainer, store stage name)
TRAINERS = {"sft": ("sft", SFTConfig, run_sft, "sft"), "rm": ("train-rm", RewardConfig, train_reward, "train_rm")}


def losses(store, model_id: str) -> list[float]:
    return [r["value"] for r in store.query(
        "SELECT value FROM metrics WHERE model_id = ? AND name = 'loss' AND split = 'train' ORDER BY step",
        [model_id])]


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(kind, store, tmp_path, tiny_policy_dir,
                                                                     tiny_reward_dir):
    command, config, train, stage = TRAINERS[kind]
    if kind == "sft":
        add_sl_pairs(store, tmp_path, rounds=1)
        base = tiny_policy_dir
    else:
        from test_reward import fill

        fill(store, n_prompts=8, pairs_per_prompt=2, seed=3)
        base = tiny_reward_dir
    one = train(store, config(base_model=str(base), output_dir=str(tmp_path / "one"), model_id="sft-one", **KW),
                progress=False)
    assert one["finished"]

    args = [CAI, command, "--db", str(store.path), "--base-model", str(base), "--output-dir",
            str(tmp_path / "two"), "--model-id", "sft-two", "--num-processes", "2", "--stop-after", "2",
            *[x for k, v in KW.items() for x in ("--set", f"{k}={v}")]]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # rank 0 alone wrote: one run row, one loss per step, one checkpoint
    runs = store.query("SELECT status, params FROM runs WHERE stage = ? AND params LIKE '%sft-two%'", [stage])
    assert [r["status"] for r in runs] == ["stopped"] and '"processes": 2' in runs[0]["params"]
    assert (tmp_path / "two" / "checkpoints" / "step-000002").exists()
    two = losses(store, "sft-two")
    assert len(two) == 2

    # the checkpoint the two processes wrote resumes in one process
    rest = train(store, config(base_model=str(base), output_dir=str(tmp_path / "two"), model_id="sft-two", **KW),
                 progress=False)
    assert rest["resumed_from_step"] == 2 and rest["finished"]
    a, b = losses(store, "sft-one"), losses(store, "sft-two")
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= RTOL * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
    assert a[-1] < a[0]  # it trained
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    # Adam divides by sqrt(v): for parameters whose gradient is ~0 the summation order can flip a
    # step's sign, so compare the weights as a whole, not element by element.
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert float((diff <= 1e-4).float().mean()) > 0.99, float(diff.max())


# DPO: 8 training pairs, 4 a step (2 a process), 2 epochs = 4 steps; a learning rate that moves the tiny model.
DPO_KW = {"beta": 0.1, "epochs": 2, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 5e-3,
          "eval_every": 100, "label_mode": "weight"}


def test_dpo_two_processes_match_one_and_their_checkpoint_resumes_in_one(store, tmp_path, tiny_policy_dir):
    from test_dpo import POLITE, RUDE, add_pairs

    from cai.dpo import DPOConfig, run_dpo

    add_pairs(store, [(f"Question {i}?", POLITE[i % 3], RUDE[i % 3], [0.95, 0.8, 0.7, 0.9][i % 4], "train")
                      for i in range(8)])

    def config(name: str) -> DPOConfig:
        return DPOConfig(policy=str(tiny_policy_dir), model_id=name, output_dir=str(tmp_path / name), **DPO_KW)

    one = run_dpo(store, config("dpo-one"), progress=False, plot=False)
    assert one["finished"] and one["steps"] == 4

    args = [CAI, "dpo", "--db", str(store.path), "--policy", str(tiny_policy_dir), "--model-id", "dpo-two",
            "--output-dir", str(tmp_path / "dpo-two"), "--num-processes", "2", "--stop-after", "2",
            *[x for k, v in DPO_KW.items() for x in ("--set", f"{k}={v}")]]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # rank 0 alone wrote: one run row (stopped), one loss per step, one checkpoint
    runs = store.query("SELECT status, params FROM runs WHERE stage = 'dpo' AND params LIKE '%dpo-two%'")
    assert [r["status"] for r in runs] == ["stopped"] and '"processes": 2' in runs[0]["params"]
    assert (tmp_path / "dpo-two" / "dpo-two" / "checkpoints" / "step-000002").exists()
    assert len(losses(store, "dpo-two")) == 2

    # the checkpoint the two processes wrote resumes in one process
    rest = run_dpo(store, config("dpo-two"), progress=False, plot=False)
    assert rest["resumed_from_step"] == 2 and rest["finished"]
    a, b = losses(store, "dpo-one"), losses(store, "dpo-two")
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= RTOL * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
    assert a[-1] < a[0]  # it trained
    wa, wb = weights(tmp_path / "dpo-one" / "dpo-one"), weights(tmp_path / "dpo-two" / "dpo-two")
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert float((diff <= 1e-4).float().mean()) > 0.99, float(diff.max())


# PPO: 8 rollouts a step (4 a process, 2 per prompt), 2 minibatches of 4, 2 epochs, 3 steps.
PPO_KW = {"steps": 3, "batch_size": 8, "samples_per_prompt": 2, "minibatch_size": 4, "ppo_epochs": 2,
          "max_new_tokens": 6, "temperature": 1.0, "learning_rate": 1e-3, "eval_split": None, "limit": 16,
          "generation_batch_size": 4, "save_every": 100, "num_samples": 2, "reward": "python:cai.ppo:reward_spaces"}
PPO_CURVES = ("reward", "kl", "score", "policy_loss", "value_loss", "approx_kl", "explained_variance")


def test_ppo_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path, tiny_policy_dir,
                                                                         demo_prompt_files):
    """Each process rolls out its block of 4 rows with the seeds one process uses for the same block
    when ``generation_batch_size`` is the block (4 here, in both runs), so both runs sample the same
    tokens; reward normalisation, whitening, token means and every minibatch loss are taken over the
    whole batch. What differs is the order of float sums (~1e-7), so the curves agree within RTOL
    (a sampled token could in principle flip on such a difference; with these few tokens it doesn't)."""
    from cai.ingest import ingest_file
    from cai.ppo import PPOConfig, run_ppo
    from cai.store import Store

    stores = {}
    for name in ("one", "two"):  # the same config is the same model id: one store (and models folder) each
        stores[name] = Store(tmp_path / name / "cai.duckdb")
        stores[name].init()
        ingest_file(stores[name], demo_prompt_files[1])
    config = PPOConfig(policy=str(tiny_policy_dir), **PPO_KW)
    one = run_ppo(stores["one"], config, progress=False, plot=False)

    args = [CAI, "ppo", "--db", str(stores["two"].path), "--policy", str(tiny_policy_dir), "--num-processes", "2",
            "--stop-after", "2", *[x for k, v in PPO_KW.items() for x in ("--set", f"{k}={v}")]]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = stores["two"].query("SELECT run_id, status, params FROM runs WHERE stage = 'ppo'")
    assert [r["status"] for r in runs] == ["stopped"] and '"processes": 2' in runs[0]["params"]
    assert list((tmp_path / "two" / "models" / "checkpoints").glob("ppo-*/step-000001"))
    samples = stores["two"].query("SELECT count(*) AS n FROM samples WHERE run_id = ?", [runs[0]["run_id"]])
    assert samples[0]["n"] == 2  # rank 0 alone wrote them (step 0)

    rest = run_ppo(stores["two"], config, progress=False, plot=False)
    assert rest["resumed_from_step"] == 2 and rest["run_id"] == runs[0]["run_id"]

    def curves(store, run_id):
        rows = store.query("SELECT step, name, value FROM metrics WHERE run_id = ? AND split = 'train' ORDER BY step",
                           [run_id])
        return {n: [r["value"] for r in rows if r["name"] == n] for n in PPO_CURVES}

    a, b = curves(stores["one"], one["run_id"]), curves(stores["two"], rest["run_id"])
    for name in PPO_CURVES:
        assert len(a[name]) == len(b[name]) == 3, name
        assert all(abs(x - y) <= RTOL * abs(x) + 1e-6 for x, y in zip(a[name], b[name], strict=True)), (name, a, b)
    assert a["approx_kl"][0] > 0  # the policy moved within each step
    assert one["path"] != rest["path"]
    wa, wb = weights(Path(one["path"])), weights(Path(rest["path"]))
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert float((diff <= 1e-4).float().mean()) > 0.99, float(diff.max())
