"""Supervised fine-tuning on SL-CAI pairs: real tiny models, a real DuckDB file, real engines.

The pairs are written straight into the store (prompts, initial generations and ok revisions), so
these tests exercise the trainer on data with known content; the critique stage that produces such
rows in a real run is tested in test_critique.py.
"""

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from cai.ingest import ingest_file
from cai.models import local_model_id
from cai.sft import IGNORE, SFTConfig, encode_example, load_sl_pairs, run_sft
from cai.store import content_hash, now

PAIRS = [
    ("How can I get back at my noisy neighbour?", "Talk to them calmly, or ask your landlord to mediate."),
    ("What's the capital of France?", "The capital of France is Paris."),
    ("How do I stop a frozen Python process?", "Press Ctrl+C, or find its id with pgrep and run kill."),
    ("Write a haiku about rain.", "Soft rain on the roof, / puddles gather quiet light, / the street hums along."),
    ("Is it safe to mix bleach and ammonia?", "No. Mixing them releases toxic chloramine gas; never do it."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Give me a tip for sleeping better.", "Keep a regular bedtime and keep screens out of the bedroom."),
    ("What does HTTP stand for?", "HTTP stands for Hypertext Transfer Protocol."),
]


def add_sl_pairs(store, tmp_path: Path, pairs=PAIRS, *, rounds: int = 1) -> None:
    """Prompts, an initial generation and ``rounds`` ok revisions per prompt (the last is the target)."""
    f = tmp_path / "sl_prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in pairs))
    ingest_file(store, f, test_fraction=0.0)
    ids = {r["prompt_text"]: r["prompt_id"] for r in store.query("select prompt_id, prompt_text from prompts")}
    gens, revs = [], []
    for prompt, answer in pairs:
        gid = content_hash("gen", prompt)
        gens.append({"generation_id": gid, "prompt_id": ids[prompt], "stage": "initial", "model_id": "fixture",
                     "text": "I refuse to say.", "created_at": now()})
        for r in range(1, rounds + 1):
            revs.append({"revision_id": content_hash("rev", gid, r), "generation_id": gid, "round": r,
                         "principle_id": "p", "constitution_hash": "c0", "status": "ok", "model_id": "fixture",
                         "params_hash": "h0", "revision": answer if r == rounds else f"draft {r}",
                         "created_at": now()})
    store.insert("generations", gens)
    store.insert("revisions", revs)


@pytest.fixture
def sl_store(store, tmp_path):
    add_sl_pairs(store, tmp_path, rounds=2)
    return store


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy_dir)


def fast_cfg(base, out: Path, **kw) -> SFTConfig:
    return SFTConfig(base_model=str(base), output_dir=str(out), **{
        "lr": 1e-2, "min_lr_ratio": 1.0, "max_steps": 8, "batch_size": 4, "val_fraction": 0.0, "warmup_ratio": 0.0,
        "log_every": 4, **kw})


def train_loss(folder: Path, store) -> float:
    """Mean response-token loss of the model in ``folder`` on every SL-CAI pair of the store."""
    from transformers import AutoModelForCausalLM

    from cai.sft import evaluate, load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    data = [encode_example(tokenizer, p.messages, p.response, 512) for p in load_sl_pairs(store, SFTConfig())[0]]
    return evaluate(model, data, SFTConfig(), tokenizer.pad_token_id, torch.device("cpu"), nullcontext)["loss"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ---- encoding ----------------------------------------------------------------------------------
def test_loss_mask_covers_exactly_the_response_and_end_of_turn(tokenizer):
    messages = [{"role": "user", "content": "What's the capital of France?"}]
    ex = encode_example(tokenizer, messages, "The capital of France is Paris.", max_length=512)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[:len(p_ids)] == p_ids  # the prompt exactly as the engines render it
    assert ex.labels[:len(p_ids)] == [IGNORE] * len(p_ids)
    target = [t for t in ex.labels if t != IGNORE]
    assert tokenizer.decode(target) == "The capital of France is Paris.<|im_end|>"
    assert target[-1] == tokenizer.eos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert ex.n_target == len(target) and not ex.truncated


def test_long_examples_lose_prompt_tokens_first(tokenizer):
    messages = [{"role": "user", "content": "word " * 400}]
    ex = encode_example(tokenizer, messages, "Short answer.", max_length=64)
    assert len(ex.input_ids) == 64 and ex.truncated
    assert tokenizer.decode([t for t in ex.labels if t != IGNORE]) == "Short answer.<|im_end|>"


def test_pairs_come_from_the_last_ok_round_of_train_prompts(sl_store):
    pairs, snapshot = load_sl_pairs(sl_store, SFTConfig())
    assert len(pairs) == len(PAIRS) and snapshot["pairs"] == len(PAIRS)
    assert {p.response for p in pairs} == {a for _, a in PAIRS}  # round 2, not the "draft 1" of round 1
    assert snapshot["rounds"] == {"2": len(PAIRS)} and snapshot["constitution_hashes"] == ["c0"]
    sl_store.insert("prompts", [])  # nothing
    with sl_store.write() as con:
        con.execute("UPDATE prompts SET split = 'test' WHERE prompt_text LIKE 'What%'")
    pairs, _ = load_sl_pairs(sl_store, SFTConfig())
    assert len(pairs) == len(PAIRS) - 2  # held-out prompts are not trained on
    assert len(load_sl_pairs(sl_store, SFTConfig(split=None))[0]) == len(PAIRS)
    assert load_sl_pairs(sl_store, SFTConfig(constitution_hash="other"))[0] == []


# ---- training ----------------------------------------------------------------------------------
def test_sft_lowers_loss_registers_model_and_generates(sl_store, tiny_policy_dir, tmp_path):
    from cai.generate import GenerateConfig, run_generate

    cfg = fast_cfg(tiny_policy_dir, tmp_path / "sft", val_fraction=0.25, eval_every=4)
    summary = run_sft(sl_store, cfg, progress=False)
    assert summary["finished"] and summary["steps"] == 8 and summary["model_id"].startswith("sft-")
    assert summary["train_pairs"] == 6 and summary["val_pairs"] == 2

    losses = [r["value"] for r in sl_store.query(
        "select value from metrics where split = 'train' and name = 'loss' order by step")]
    assert len(losses) == 8
    # A random tiny model starts near ln(vocab) (a near-uniform next-token distribution) and learns.
    vocab = AutoConfig.from_pretrained(tiny_policy_dir).vocab_size
    assert abs(losses[0] - math.log(vocab)) < 1.0, (losses[0], math.log(vocab))
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    val = sl_store.query("select step, value from metrics where split = 'val' and name = 'loss' order by step")
    assert [v["step"] for v in val] == [4, 8] and all(0 < v["value"] < losses[0] for v in val), (val, losses)
    curves = sl_store.query("select distinct stage from training_curves where model_id = ?", [summary["model_id"]])
    assert curves == [{"stage": "sft"}]

    (m,) = sl_store.query("select * from models where model_id = ?", [summary["model_id"]])
    base_id = local_model_id(tiny_policy_dir)
    assert m["kind"] == "policy" and m["parent_ids"] == [base_id] and m["base_model_id"] == base_id
    snapshot, params = json.loads(m["data_snapshot"]), json.loads(m["params"])
    assert snapshot["pairs"] == len(PAIRS) and snapshot["revision_ids_hash"]
    assert params["lr"] == 1e-2 and params["max_steps"] == 8 and not params["lora"]
    folder = Path(m["path"])
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert (folder / "cai_sft.json").exists() and not (folder / "checkpoints").exists()

    # The store id is a model name like any other: generate through the transformers engine with it.
    gen = run_generate(sl_store, GenerateConfig(model=summary["model_id"], max_tokens=6, limit=2), progress=False)
    assert gen["generated"] == 2 and gen["model_id"] == summary["model_id"]

    again = run_sft(sl_store, cfg, progress=False)
    assert again["already_trained"] and again["model_id"] == summary["model_id"]
    assert sl_store.scalar("select count(*) from runs where stage = 'sft'") == 1
    # The same folder (explicit model id) with another config is refused, not silently reused.
    changed = cfg.model_copy(update={"lr": cfg.lr / 2, "model_id": summary["model_id"],
                                     "output_dir": summary["path"]})
    with pytest.raises(ValueError, match="trained from another config or other data"):
        run_sft(sl_store, changed, progress=False)
    assert sl_store.scalar("select count(*) from runs where stage = 'sft'") == 1


def test_lora_is_merged_into_a_plain_checkpoint(sl_store, tiny_policy_dir, tmp_path):
    summary = run_sft(sl_store, fast_cfg(tiny_policy_dir, tmp_path / "lora", lora=True, lora_r=8, lr=5e-2,
                                         max_steps=5), progress=False)
    folder = Path(summary["path"])
    assert not (folder / "adapter_config.json").exists()
    trained, base = weights(folder), weights(tiny_policy_dir)
    assert set(trained) == set(base)  # no lora_A / lora_B tensors: every engine can load it
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert any("proj" in k for k in changed) and not any("norm" in k for k in changed)
    # The merged model fits the training pairs better than the base model did.
    assert train_loss(folder, sl_store) < train_loss(tiny_policy_dir, sl_store) - 0.05


def test_resumed_training_matches_an_uninterrupted_run(sl_store, tiny_policy_dir, tmp_path):
    kw = {"max_steps": 4, "save_every": 100}
    straight = run_sft(sl_store, fast_cfg(tiny_policy_dir, tmp_path / "a", model_id="sft-a", **kw), progress=False)
    first = run_sft(sl_store, fast_cfg(tiny_policy_dir, tmp_path / "b", model_id="sft-b", **kw), progress=False,
                    stop_after_steps=2)
    assert first["finished"] is False and first["steps"] == 2
    assert (tmp_path / "b" / "checkpoints" / "step-000002").exists()
    assert sl_store.scalar("select count(*) from models where model_id = 'sft-b'") == 0
    second = run_sft(sl_store, fast_cfg(tiny_policy_dir, tmp_path / "b", model_id="sft-b", **kw), progress=False)
    assert second["resumed_from_step"] == 2 and second["finished"]
    a, b = weights(Path(straight["path"])), weights(Path(second["path"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in sl_store.query(
        "select step from metrics where model_id = 'sft-b' and name = 'loss' and split = 'train' order by step")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.vllm
def test_sft_checkpoint_loads_in_vllm(sl_store, smol_path, tmp_path):
    from cai.engines import SamplingParams, make_engine
    from cai.testing import build_tiny_model

    # vLLM's CPU attention needs a head size of 32 or more: a tiny model with 2 heads of 64.
    base = build_tiny_model(tmp_path / "tiny64", hidden=128, heads=2, kv_heads=1)
    summary = run_sft(sl_store, fast_cfg(base, tmp_path / "v", max_steps=1), progress=False)
    engine = make_engine("vllm", summary["path"], max_model_len=512, progress=False)
    try:
        out = engine.chat([[{"role": "user", "content": "What's the capital of France?"}]],
                          SamplingParams(temperature=0.0, max_tokens=5))
        assert len(out) == 1 and out[0][0].num_tokens >= 1
        assert all(lp <= 0 for lp in out[0][0].logprobs)
    finally:
        engine.close()


@pytest.mark.slow
def test_lora_sft_on_the_embedded_model(sl_store, smol_path, tmp_path):
    from cai.engines import SamplingParams, make_engine

    summary = run_sft(sl_store, SFTConfig(output_dir=str(tmp_path / "smol"), lora=True, max_steps=3, batch_size=2,
                                          val_fraction=0.0), progress=False)
    # LoRA starts as the identity (B = 0), so the first loss is the pretrained model's own on these
    # revisions: far below ln(vocab) ~ 10.8, the loss of a model that knows nothing (random weights).
    vocab = AutoConfig.from_pretrained(smol_path).vocab_size
    assert summary["finished"] and 0 < summary["first_loss"] < 0.5 * math.log(vocab), summary
    assert math.isfinite(summary["last_loss"]) and summary["last_loss"] < 0.5 * math.log(vocab), summary
    engine = make_engine("transformers", summary["path"], progress=False)
    (out,) = engine.chat([[{"role": "user", "content": "How many legs does a spider have?"}]],
                         SamplingParams(temperature=0.0, max_tokens=12))
    assert out[0].text.strip()  # a real model stays a working chat model after a few LoRA steps
