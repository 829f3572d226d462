"""Reward model (issue 5): the soft-label loss, the prompt split, learning a planted preference,
resuming bit for bit, scoring, and the CLI. Tiny models on the real tokenizer; no mocks."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai.reward import (
    Pair,
    RewardConfig,
    agreement,
    calibration,
    lr_at,
    preference_loss,
    split_by_prompt,
    train_reward,
)
from cai.rm import RewardModel, evaluate_human_pairs, read_pairs, score_store
from cai.store import Store, content_hash

WORDS = ("apple river stone cloud green quick lamp table music paper window garden silver orange forest "  # noqa: SIM905
         "candle mirror yellow bridge rocket planet ocean winter summer coffee pencil").split()
MARKER = "zebra"  # the planted preference: a response containing it is better


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU two OpenMP threads can be
    many times slower than one (they spin at barriers while other processes hold the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted_rows(n_prompts: int, pairs_per_prompt: int, seed: int = 0):
    """Prompts and judge-style comparisons where the response holding MARKER wins with p in [0.75, 0.95]."""
    rng = random.Random(seed)
    prompts, comparisons = [], []
    for i in range(n_prompts):
        messages = [{"role": "user", "content": f"Question {i}: " + " ".join(rng.choices(WORDS, k=6))}]
        pid = content_hash(messages)
        prompts.append({"prompt_id": pid, "messages": json.dumps(messages), "prompt_text": messages[0]["content"],
                        "split": "train"})
        for j in range(pairs_per_prompt):
            a, b = rng.choices(WORDS, k=rng.randint(6, 14)), rng.choices(WORDS, k=rng.randint(6, 14))
            a_wins = rng.random() < 0.5
            winner = a if a_wins else b
            winner.insert(rng.randrange(len(winner) + 1), MARKER)
            confidence = rng.uniform(0.75, 0.95)
            comparisons.append({
                "comparison_id": content_hash("planted", seed, pid, j), "prompt_id": pid,
                "pair_kind": "two_samples", "response_a": " ".join(a), "response_b": " ".join(b),
                "p_a": confidence if a_wins else 1 - confidence, "status": "ok",
                "judge_spec_hash": "judge-synthetic", "judge_name": "planted", "constitution_hash": "const-x"})
    return prompts, comparisons


def fill(store: Store, n_prompts: int = 40, pairs_per_prompt: int = 3, seed: int = 0) -> None:
    prompts, comparisons = planted_rows(n_prompts, pairs_per_prompt, seed)
    store.insert("prompts", prompts)
    store.insert("comparisons", comparisons)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- the loss, by hand --------------------------------------------------------------------------
def test_soft_label_loss_equals_hand_computed_values():
    r_a = torch.tensor([1.0, 0.0, -2.0, 0.3])
    r_b = torch.tensor([0.0, 0.0, 1.0, 0.3])
    p_a = torch.tensor([0.9, 0.5, 0.2, 1.0])
    loss = preference_loss(r_a, r_b, p_a)
    # -(p log s(d) + (1-p) log s(-d)), d = r_a - r_b, written out:
    # d=1,  p=0.9: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617
    # d=0,  p=0.5: log 2                              = 0.6931472
    # d=-3, p=0.2: 0.2 * 3.0485874 + 0.8 * 0.0485874 = 0.6485874
    # d=0,  p=1.0: log 2                              = 0.6931472
    assert loss.tolist() == pytest.approx([0.4132617, 0.6931472, 0.6485874, 0.6931472], abs=1e-6)
    for i in range(4):
        d, p = float(r_a[i] - r_b[i]), float(p_a[i])
        assert float(loss[i]) == pytest.approx(-(p * math.log(sigmoid(d)) + (1 - p) * math.log(sigmoid(-d))), abs=1e-6)

    # A 0.55 label pulls less than a 0.95 one: dL/dd = sigmoid(d) - p, so at d = 0 it is -0.05 vs -0.45.
    d = torch.zeros(2, requires_grad=True)
    preference_loss(d, torch.zeros(2), torch.tensor([0.55, 0.95])).sum().backward()
    assert d.grad.tolist() == pytest.approx([-0.05, -0.45], abs=1e-6)
    # ... and the loss is minimal where sigmoid(d) equals the label, not at d = infinity.
    gaps = torch.linspace(-3, 3, 601)
    best = gaps[preference_loss(gaps, torch.zeros_like(gaps), torch.full_like(gaps, 0.8)).argmin()]
    assert float(best) == pytest.approx(math.log(0.8 / 0.2), abs=0.01)


def test_loss_options_hard_labels_margin_centring():
    r_a, r_b, p = torch.tensor([0.5, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.7, 0.2])
    hard = preference_loss(r_a, r_b, p, hard_labels=True)
    assert hard.tolist() == pytest.approx([-math.log(sigmoid(0.5)), -math.log(sigmoid(-1.0))], abs=1e-6)
    # hard label + margin m is Llama 2's -log sigmoid(r_chosen - r_rejected - m)
    hard_margin = preference_loss(r_a, r_b, p, hard_labels=True, margin=0.25)
    assert hard_margin.tolist() == pytest.approx([-math.log(sigmoid(0.5 - 0.25)), -math.log(sigmoid(-1.0 - 0.25))],
                                                 abs=1e-6)
    # soft label: the margin is scaled by 2p - 1 (0.4 and -0.6 here)
    z = [0.5 - 1.0 * 0.4, 1.0 + 1.0 * 0.6]
    soft_margin = preference_loss(r_a, r_b, p, margin=1.0)
    expect = [-(q * math.log(sigmoid(x)) + (1 - q) * math.log(sigmoid(-x))) for q, x in zip([0.7, 0.2], z, strict=True)]
    assert soft_margin.tolist() == pytest.approx(expect, abs=1e-6)
    centred = preference_loss(r_a, r_b, p, center_coef=0.1)
    assert (centred - preference_loss(r_a, r_b, p)).tolist() == pytest.approx([0.1 * 0.25, 0.1 * 9.0], abs=1e-6)


def test_agreement_calibration_and_schedule():
    q, p = torch.tensor([0.9, 0.2, 0.6, 0.7]), torch.tensor([1.0, 0.0, 0.0, 0.5])
    r_a = torch.logit(q)
    assert agreement(r_a, torch.zeros(4), p) == (2.0, 3)  # the tie has no majority
    cal = calibration(q, p)
    assert cal["brier"] == pytest.approx((0.01 + 0.04 + 0.36 + 0.04) / 4)
    # decided pairs: confidence 0.9, 0.8, 0.6 in three bins, right, right, wrong
    assert cal["ece"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)
    cfg = RewardConfig(lr=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))


# ---- the split ----------------------------------------------------------------------------------
def test_split_by_prompt_never_leaks_a_prompt():
    rng = random.Random(1)
    pairs = [Pair(f"c{i}-{j}", f"prompt-{i}", [], "a", "b", 0.7) for i in range(50) for j in range(rng.randint(1, 4))]
    train, val = split_by_prompt(pairs, 0.2, seed=0)
    assert {p.prompt_id for p in train}.isdisjoint({p.prompt_id for p in val})
    assert sorted(p.comparison_id for p in train + val) == sorted(p.comparison_id for p in pairs)
    assert len({p.prompt_id for p in val}) == 10
    shuffled = pairs[:]
    rng.shuffle(shuffled)
    assert {p.prompt_id for p in split_by_prompt(shuffled, 0.2, seed=0)[1]} == {p.prompt_id for p in val}
    assert {p.prompt_id for p in split_by_prompt(pairs, 0.2, seed=1)[1]} != {p.prompt_id for p in val}
    # at least one prompt on each side whenever there are two
    tiny_train, tiny_val = split_by_prompt(pairs[:2] + [Pair("z", "other", [], "a", "b", 0.9)], 0.01, seed=0)
    assert tiny_train and tiny_val
    assert split_by_prompt(pairs, 0.0, seed=0) == (pairs, [])


# ---- training on a planted preference -------------------------------------------------------------
# Tuned on 8 (data seed, training seed) pairs: validation accuracy 1.0 on all of them at 25 steps.
PLANTED = dict(lr=3e-3, max_steps=25, batch_size=16, val_fraction=0.25, warmup_ratio=0.1, eval_every=5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_reward_dir):
    store = Store(tmp_path_factory.mktemp("rm") / "cai.duckdb")
    fill(store, n_prompts=40, pairs_per_prompt=3, seed=0)
    cfg = RewardConfig(base_model=str(tiny_reward_dir), **PLANTED)
    return store, train_reward(store, cfg, progress=False), cfg


def test_learns_planted_preference(planted):
    store, summary, cfg = planted
    assert summary["finished"] and summary["steps"] == 25
    assert summary["val"]["accuracy"] > 0.95, summary
    print(f"planted preference: val accuracy {summary['val']['accuracy']} in {summary['train_seconds']}s")

    # per-step train metrics and per-eval validation metrics, under the model id
    rows = store.query("SELECT split, name, count(*) AS n FROM metrics WHERE model_id = ? GROUP BY ALL",
                       [summary["model_id"]])
    counts = {(r["split"], r["name"]): r["n"] for r in rows}
    assert counts[("train", "loss")] == 25 and counts[("train", "lr")] == 25
    assert counts[("val", "accuracy")] == 5 and counts[("val", "brier")] == 5 and counts[("val", "ece")] == 5
    curve = store.query("SELECT step, value FROM training_curves WHERE model_id = ? AND split = 'train' "
                        "AND metric = 'loss' ORDER BY step", [summary["model_id"]])
    assert curve[-1]["value"] < curve[0]["value"]

    # registered with its data snapshot and lineage
    model = store.query("SELECT * FROM models WHERE model_id = ?", [summary["model_id"]])[0]
    assert model["kind"] == "reward" and model["parent_ids"] == [summary["base_model_id"]]
    snap = json.loads(model["data_snapshot"])
    assert snap["comparisons"] == 120 and snap["judge_spec_hashes"] == ["judge-synthetic"]
    assert snap["constitution_hashes"] == ["const-x"] and snap["train_prompts"] + snap["val_prompts"] == 40
    assert snap["val_prompts"] == 10 and snap["train_pairs"] + snap["val_pairs"] == 120

    # the saved model scores the marker higher, and validation rewards are centred at 0
    rm = RewardModel.load(summary["model_id"], store=store)
    assert rm.offset == pytest.approx(summary["offset"], abs=1e-4)
    prompts, comparisons = planted_rows(40, 3, seed=0)
    messages = {p["prompt_id"]: json.loads(p["messages"]) for p in prompts}
    val_pairs = split_by_prompt([Pair(c["comparison_id"], c["prompt_id"], messages[c["prompt_id"]], c["response_a"],
                                      c["response_b"], c["p_a"]) for c in comparisons], 0.25, 0)[1]
    rewards = rm.score([p.messages for p in val_pairs] * 2, [p.response_a for p in val_pairs] +
                       [p.response_b for p in val_pairs])
    assert sum(rewards) / len(rewards) == pytest.approx(0.0, abs=1e-4)
    n = len(val_pairs)
    with_marker = [rewards[i] if MARKER in p.response_a else rewards[n + i] for i, p in enumerate(val_pairs)]
    without = [rewards[n + i] if MARKER in p.response_a else rewards[i] for i, p in enumerate(val_pairs)]
    assert sum(w > wo for w, wo in zip(with_marker, without, strict=True)) / n > 0.95

    # a second identical call finds the finished model instead of training again
    again = train_reward(store, cfg, progress=False)
    assert again["already_trained"] and again["model_id"] == summary["model_id"]
    # ...but the same folder name with another config is not "already done": content decides.
    changed = cfg.model_copy(update={"lr": cfg.lr / 3, "model_id": summary["model_id"]})
    with pytest.raises(ValueError, match="trained from another config or other data"):
        train_reward(store, changed, progress=False)


def test_saved_model_is_a_plain_hf_checkpoint(planted):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    store, summary, _ = planted
    hf = AutoModelForSequenceClassification.from_pretrained(summary["path"]).eval()
    tok = AutoTokenizer.from_pretrained(summary["path"])
    meta = json.loads((Path(summary["path"]) / "cai_reward.json").read_text())
    assert meta["offset"] == pytest.approx(summary["offset"], abs=1e-4) and meta["chat_template"] is True
    rm = RewardModel.load(summary["path"])
    convo = [{"role": "user", "content": "Question: apple"}]
    for response in ["river zebra stone", "lamp table"]:
        ids = tok.apply_chat_template(convo + [{"role": "assistant", "content": response}], return_tensors="pt",
                                      return_dict=True)
        with torch.no_grad():
            logit = float(hf(**ids).logits[0, 0])
        assert rm.score([convo], [response], raw=True)[0] == pytest.approx(logit, abs=1e-4)
        assert rm.score([convo], [response])[0] == pytest.approx(logit - meta["offset"], abs=1e-4)
    assert not (Path(summary["path"]) / "checkpoints").exists()
    data = json.loads((Path(summary["path"]) / "training_data.json").read_text())
    assert len(data["train_comparison_ids"]) + len(data["val_comparison_ids"]) == 120


def test_scores_do_not_depend_on_batching(tiny_reward_dir):
    rm = RewardModel.load(tiny_reward_dir)
    prompts = ["short", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a longer prompt " * 5}],
               "third prompt"]
    responses = ["a", "a much longer response " * 10, "medium response here"]
    one_by_one = [rm.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert rm.score(prompts, responses, batch_size=3) == pytest.approx(one_by_one, abs=1e-5)
    rm.max_length = 16  # left truncation keeps the end of the response
    assert len(rm.score(prompts, responses)) == 3


# ---- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_gives_bit_identical_weights(tmp_path, tiny_reward_dir, lora):
    store = Store(tmp_path / "cai.duckdb")
    fill(store, n_prompts=12, pairs_per_prompt=2, seed=3)
    common = dict(base_model=str(tiny_reward_dir), lr=2e-3, max_steps=6, batch_size=2, grad_accum=2,
                  val_fraction=0.2, save_every=2, eval_every=3, lora=lora, lora_r=4, lora_dropout=0.1, seed=7)
    whole = train_reward(store, RewardConfig(**common, model_id="whole", output_dir=str(tmp_path / "whole")),
                         progress=False)
    cfg = RewardConfig(**common, model_id="parts", output_dir=str(tmp_path / "parts"))
    first = train_reward(store, cfg, progress=False, stop_after_steps=3)
    assert not first["finished"] and first["steps"] == 3
    ckpts = sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000003"]
    # As if the process had died before the step-3 checkpoint: resume from step 2, redo step 3.
    shutil.rmtree(tmp_path / "parts" / "checkpoints" / "step-000003")
    second = train_reward(store, cfg, progress=False)
    assert second["resumed_from_step"] == 2 and second["finished"]
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert whole["offset"] == second["offset"] and whole["val"] == second["val"]
    runs = store.query("SELECT status FROM runs WHERE stage = 'train_rm' ORDER BY started_at")
    assert [r["status"] for r in runs] == ["ok", "stopped", "ok"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_reward_dir):
    store = Store(tmp_path / "cai.duckdb")
    fill(store, n_prompts=10, pairs_per_prompt=2, seed=4)
    common = dict(base_model=str(tiny_reward_dir), lr=1e-3, max_steps=2, val_fraction=0.2, warmup_ratio=0.0)
    train_reward(store, RewardConfig(**common, batch_size=8, output_dir=str(tmp_path / "big")), progress=False)
    train_reward(store, RewardConfig(**common, batch_size=2, grad_accum=4, output_dir=str(tmp_path / "acc")),
                 progress=False)
    a, b = load_file(tmp_path / "big" / "model.safetensors"), load_file(tmp_path / "acc" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_no_usable_comparisons_is_a_clear_error(store, tiny_reward_dir):
    with pytest.raises(LookupError, match="usable comparisons"):
        train_reward(store, RewardConfig(base_model=str(tiny_reward_dir)), progress=False)


# ---- human pairs, scoring, CLI ----------------------------------------------------------------------
def human_pairs_file(path, n: int = 20, seed: int = 11):
    """PandaLM-format pairs (prompt as a chat list, votes, agreement) where people chose the marker."""
    prompts, comparisons = planted_rows(n, 1, seed)
    with path.open("w") as f:
        for p, c in zip(prompts, comparisons, strict=True):
            a_wins = c["p_a"] > 0.5
            f.write(json.dumps({"id": c["comparison_id"], "prompt": json.loads(p["messages"]),
                                "chosen": c["response_a"] if a_wins else c["response_b"],
                                "rejected": c["response_b"] if a_wins else c["response_a"],
                                "votes": [1, 1, 1], "agreement": "3/3"}) + "\n")
    return path


def test_rm_eval_on_human_pairs(planted, tmp_path):
    store, summary, _ = planted
    f = human_pairs_file(tmp_path / "human.jsonl")
    assert len(read_pairs(f, limit=5)) == 5
    result = evaluate_human_pairs(store, summary["model_id"], f)
    assert result["pairs"] == 20 and result["accuracy"] >= 0.95
    assert result["accuracy_by_agreement"]["3/3"]["pairs"] == 20
    rows = store.query("SELECT metric, value, dataset FROM evaluations WHERE kind = 'reward_model' AND subject_id = ?",
                       [summary["model_id"]])
    assert {r["metric"] for r in rows} == {"accuracy", "mean_margin", "accuracy_unanimous", "length_baseline",
                                           "accuracy_minus_length_baseline"}
    low, high = result["accuracy_95ci"]
    assert low < result["accuracy"] <= high <= 1 and 0 <= result["length_baseline"] <= 1
    assert all(r["dataset"] == "human.jsonl" for r in rows)


def test_cli_train_score_eval(tmp_path, tiny_reward_dir, monkeypatch):
    """`cai train-rm` as a real process; `cai rm score` and `cai rm eval` in-process (same parsing, no
    second torch import)."""
    from test_cli import cai
    from typer.testing import CliRunner

    from cai.cli import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    db = tmp_path / "cai.duckdb"
    fill(Store(db), n_prompts=8, pairs_per_prompt=2, seed=5)
    out = cai("train-rm", "--base-model", tiny_reward_dir, "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3",
              db=db)
    summary = json.loads(out.stdout)
    assert summary["finished"] and summary["model_id"].startswith("rm-")
    model_id = summary["model_id"]

    def run(*args):
        result = CliRunner().invoke(app, [*map(str, args), "--db", str(db)])
        return result

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": 1, "prompt": "hi", "response": "hello"}) + "\n" +
                    json.dumps({"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}) + "\n")
    scored_file = tmp_path / "scored.jsonl"
    result = run("rm", "score", rows, "--model", model_id, "--out", scored_file)
    assert result.exit_code == 0, result.output
    scored = [json.loads(line) for line in scored_file.read_text().splitlines()]
    assert isinstance(scored[0]["reward"], float) and {"reward_chosen", "reward_rejected"} <= scored[1].keys()

    human = human_pairs_file(tmp_path / "human.jsonl", n=6)
    result = run("rm", "eval", human, "--model", model_id, "--limit", "4")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pairs"] == 4

    bad = run("train-rm", "--base-model", tiny_reward_dir, "--val-fraction", "2")
    assert bad.exit_code == 1 and "val_fraction" in bad.stderr and "less than 1" in bad.stderr
    missing = run("rm", "eval", tmp_path / "nope.jsonl", "--model", model_id)
    assert missing.exit_code == 1 and "no such file" in missing.stderr


def test_score_rows_from_the_store(planted):
    store, summary, _ = planted
    rm = RewardModel.load(summary["model_id"], store=store)
    rows = score_store(rm, store, sql="SELECT c.comparison_id AS id, p.messages, c.response_a AS response "
                                      "FROM comparisons c JOIN prompts p USING (prompt_id)", limit=10)
    assert len(rows) == 10 and all(isinstance(r["reward"], float) and "id" in r for r in rows)
    assert score_store(rm, store) == []  # the default query reads generations: none here
    with pytest.raises(ValueError, match="response"):
        score_store(rm, store, sql="SELECT prompt_id FROM prompts")


@pytest.mark.slow
def test_train_rm_on_smollm2_lora(tmp_path, smol_path):
    """A few LoRA steps on the real embedded model: it trains, merges, saves a loadable HF folder."""
    from transformers import AutoModelForSequenceClassification

    store = Store(tmp_path / "cai.duckdb")
    fill(store, n_prompts=6, pairs_per_prompt=2, seed=9)
    summary = train_reward(store, RewardConfig(base_model=smol_path, lora=True, max_steps=3, batch_size=2,
                                               max_length=128, val_fraction=0.34), progress=False)
    assert summary["finished"] and summary["val_pairs"] >= 2
    hf = AutoModelForSequenceClassification.from_pretrained(summary["path"])
    assert hf.config.num_labels == 1 and not any("lora" in k for k in hf.state_dict())
    rm = RewardModel.load(summary["model_id"], store=store)
    assert len(rm.score(["hi"], ["hello"])) == 1


def test_train_layers_freezes_all_but_the_head_and_top_blocks(tmp_path, tiny_reward_dir):
    """train_layers=0 is a probe on frozen features: only the score head moves; 1 adds the last block
    and the final norm. A frozen backbone is also refused beside LoRA."""
    store = Store(tmp_path / "cai.duckdb")
    fill(store, n_prompts=10, pairs_per_prompt=2, seed=5)
    base = load_file(tiny_reward_dir / "model.safetensors")
    moved = {}
    for n in (0, 1):
        out = tmp_path / f"top{n}"
        train_reward(store, RewardConfig(base_model=str(tiny_reward_dir), lr=1e-2, max_steps=2, val_fraction=0.2,
                                         warmup_ratio=0.0, train_layers=n, output_dir=str(out)), progress=False)
        saved = load_file(out / "model.safetensors")
        moved[n] = {k for k in saved if not torch.equal(saved[k], base[k])}
    n_blocks = 1 + max(int(k.split(".")[2]) for k in base if k.startswith("model.layers."))
    assert moved[0] == {"score.weight"}
    last = f"model.layers.{n_blocks - 1}."
    assert moved[1] - moved[0] and all(k.startswith((last, "model.norm", "score")) for k in moved[1])
    assert any(k.startswith(last) for k in moved[1])
    with pytest.raises(ValueError, match="train_layers and lora"):
        RewardConfig(base_model=str(tiny_reward_dir), train_layers=0, lora=True)
