"""DPO: the loss against hand-computed values, then a real run on a tiny model with soft labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cai.dpo import DPOConfig, dpo_loss, run_dpo
from cai.models import local_model_id
from cai.store import content_hash, now


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dpo_loss_modes_hand_computed():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    p = torch.tensor([1.0, 0.75])
    # h = beta * ((pc - rc) - (pr - rr)) = 0.5 * [(1) - (-1), (0) - (1)] = [1.0, -0.5]
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    hard, stats = dpo_loss(pc, pr, rc, rr, p, beta=0.5, label_mode="hard")
    assert hard.item() == pytest.approx(-(ls(1.0) + ls(-0.5)) / 2, abs=1e-6)
    assert stats["accuracy"].item() == 0.5 and stats["reward_margin"].item() == pytest.approx(0.25)
    smooth, _ = dpo_loss(pc, pr, rc, rr, p, beta=0.5, label_mode="smoothing")
    assert smooth.item() == pytest.approx((-ls(1.0) + (-0.75 * ls(-0.5) - 0.25 * ls(0.5))) / 2, abs=1e-6)
    weighted, _ = dpo_loss(pc, pr, rc, rr, p, beta=0.5, label_mode="weight")
    # weights 2p - 1 = [1, 0.5], normalised by their sum
    assert weighted.item() == pytest.approx((1 * -ls(1.0) + 0.5 * -ls(-0.5)) / 1.5, abs=1e-6)


def test_soft_label_smoothing_is_calibrated():
    """With smoothing, the loss is minimal where sigma(h) equals the soft label (not at h = infinity)."""
    hs = torch.linspace(-5, 5, 2001)
    zeros = torch.zeros_like(hs)
    losses = torch.stack([dpo_loss(h.view(1), zeros[:1], zeros[:1], zeros[:1], torch.tensor([0.8]), 1.0)[0]
                          for h in hs])
    best = hs[losses.argmin()].item()
    assert 1 / (1 + math.exp(-best)) == pytest.approx(0.8, abs=0.01)


def add_pairs(store, pairs):
    """Prompts and labelled comparisons straight into the store (what the judge stage writes)."""
    prompts, comps = [], []
    for i, (question, a, b, p_a, split) in enumerate(pairs):
        messages = [{"role": "user", "content": question}]
        pid = content_hash(messages)
        prompts.append({"prompt_id": pid, "messages": json.dumps(messages), "prompt_text": question,
                        "split": split, "source": "test", "source_line": i, "created_at": now()})
        comps.append({"comparison_id": content_hash("c", i), "prompt_id": pid, "pair_kind": "two_samples",
                      "response_a": a, "response_b": b, "p_a": p_a, "status": "ok", "judge_name": "test",
                      "created_at": now()})
    store.insert("prompts", prompts)
    store.insert("comparisons", comps)


POLITE = ["Happy to help! Here is a clear answer.", "Sure, glad to explain it step by step.",
          "Of course. Here is what I know about that."]
RUDE = ["No.", "Figure it out yourself.", "Whatever."]


@pytest.mark.parametrize("label_mode", ["weight", "smoothing"])
def test_dpo_loss_falls_and_margin_rises_with_soft_labels(store, tiny_policy_dir, one_thread, label_mode):
    questions = ["How do I boil an egg?", "What is a prime number?", "Explain rain.", "How do plants grow?",
                 "What is DNS?", "Why is the sky blue?", "How do magnets work?", "What is a list in Python?"]
    pairs = []
    for i, q in enumerate(questions):
        polite, rude = POLITE[i % 3], RUDE[i % 3]
        p = [0.95, 0.8, 0.7, 0.9][i % 4]
        # alternate which side the preferred response is on; the view turns them into chosen/rejected
        pairs.append((q, polite, rude, p, "train") if i % 2 else (q, rude, polite, 1 - p, "train"))
    pairs.append(("What is an atom?", POLITE[0], RUDE[1], 0.85, "test"))
    pairs.append(("How do birds fly?", RUDE[2], POLITE[1], 0.1, "test"))
    add_pairs(store, pairs)

    cfg = DPOConfig(policy=str(tiny_policy_dir), label_mode=label_mode, beta=0.1, epochs=6, batch_size=4,
                    micro_batch_size=2, learning_rate=5e-3, eval_every=4, seed=0)
    summary = run_dpo(store, cfg, progress=False)
    assert summary["train_pairs"] == 8 and summary["held_out_pairs"] == 2 and summary["steps"] == 12

    def curve(name, split="train"):
        return [r["value"] for r in store.query(
            "SELECT value FROM training_curves WHERE run_id = ? AND metric = ? AND split = ? ORDER BY step",
            [summary["run_id"], name, split])]

    loss, margin = curve("loss"), curve("logp_margin")
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.1, loss
    assert sum(margin[-3:]) / 3 > sum(margin[:3]) / 3 + 5.0, margin
    assert summary["eval_loss_end"] < summary["eval_loss_start"]
    row = store.query("SELECT * FROM models WHERE model_id = ?", [summary["model_id"]])[0]
    policy_id = local_model_id(tiny_policy_dir)
    assert row["kind"] == "policy" and row["parent_ids"] == [policy_id, policy_id]
    assert json.loads(row["params"])["label_mode"] == label_mode
    assert Path(row["path"], "model.safetensors").exists() and Path(summary["plot"]).exists()


def test_dpo_lora_trains_with_the_policy_as_its_own_reference(store, tiny_policy_dir, one_thread, causal_lm_loads):
    """lora + gradient checkpointing: the margin rises, one model is ever loaded (the reference is the
    policy with its adapters disabled), and the saved folder is a plain merged model."""
    from safetensors.torch import load_file

    questions = ["How do I boil an egg?", "What is a prime number?", "Explain rain.", "How do plants grow?"]
    add_pairs(store, [(q, POLITE[i % 3], RUDE[i % 3], 0.9, "train") for i, q in enumerate(questions)])
    loads = causal_lm_loads
    cfg = DPOConfig(policy=str(tiny_policy_dir), lora=True, lora_r=8, gradient_checkpointing=True, epochs=6,
                    batch_size=4, micro_batch_size=2, learning_rate=2e-2, beta=0.1, seed=0)
    summary = run_dpo(store, cfg, progress=False, plot=False)
    assert len(loads) == 1, loads  # no second copy for the reference
    assert "adapters disabled" in summary["reference"]

    def curve(name):
        return [r["value"] for r in store.query(
            "SELECT value FROM metrics WHERE run_id = ? AND name = ? AND split = 'train' ORDER BY step",
            [summary["run_id"], name])]

    # step 1 runs before any update: the adapted policy (LoRA's B starts at 0) equals its reference
    assert abs(curve("chosen_reward")[0]) < 1e-4 and abs(curve("rejected_reward")[0]) < 1e-4
    margin = curve("logp_margin")
    assert margin[-1] > margin[0] + 1.0, margin
    saved = load_file(str(Path(summary["path"]) / "model.safetensors"))
    base = load_file(str(Path(tiny_policy_dir) / "model.safetensors"))
    assert not any("lora" in k for k in saved) and set(saved) == set(base)  # merged: a plain model
    assert any(not torch.equal(saved[k], base[k]) for k in base)


def test_dpo_cli_validates_the_new_options(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    result = CliRunner().invoke(app, ["dpo", "--db", str(tmp_path / "x.duckdb"), "--load-dtype", "float16"])
    assert result.exit_code != 0 and "load_dtype" in result.output
    result = CliRunner().invoke(app, ["dpo", "--db", str(tmp_path / "x.duckdb"), "--model-id", "../up"])
    assert result.exit_code != 0 and "model id" in result.output
    cfg = DPOConfig(lora=True, gradient_checkpointing=True, load_dtype="bfloat16", num_processes=2)
    assert cfg.lr == 1e-5 and DPOConfig().lr == 1e-6  # LoRA's default learning rate is higher
    assert cfg.identity() == DPOConfig(lora=True, gradient_checkpointing=True, load_dtype="bfloat16").identity()


def test_load_dtype_auto_is_float32_on_cpu_and_explicit_choices_win():
    from cai.training import load_dtype_for

    cpu = torch.device("cpu")
    assert load_dtype_for("auto", cpu) == torch.float32 and load_dtype_for("auto", cpu, trained=True) == torch.float32
    assert load_dtype_for("bfloat16", cpu, trained=True) == torch.bfloat16
    assert load_dtype_for("float32", torch.device("cuda")) == torch.float32
