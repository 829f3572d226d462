"""PPO seconds per step: ours (cai/ppo.py) against TRL 1.12's experimental ``PPOTrainer``, in one run.

TRL dropped its PPO trainer after 1.12, so this script builds a throw-away virtual environment
(default ``/tmp/cai-bench-trl112``, reused on later runs) with ``torch==2.13.0`` (the local CPU
build), ``trl==1.12.*`` and this environment's transformers version, and runs TRL there in a
subprocess. Both trainers get the same tiny models (a policy, and a reward model that also
initialises the critic, built with ``cai.testing`` on the SmolLM2 tokenizer), the same prompts,
the same rollout batch, minibatch, epochs, response length, temperature and torch threads. The
first ``--warmup`` steps are not counted; seconds per step is the median of the rest.

What each step does, in both: sample a batch from the live policy, score it with the reward model,
reference / value forward passes, ``ppo_epochs`` x minibatches of clipped PPO updates.

    .venv/bin/python bench/ppo.py
    .venv/bin/python bench/ppo.py --steps 8 --batch-size 16 --response-length 32 --threads 2
    .venv/bin/python bench/ppo.py --skip-trl          # ours only
    .venv/bin/python bench/ppo.py --vllm              # also ours with vLLM rollouts (weights reloaded each step)
    .venv/bin/python bench/ppo.py --skip-trl --vllm --policy data/models/sft-... --reward data/models/rm-...
                                                      # vLLM vs transformers rollouts on real models

If TRL 1.12 cannot be installed or run here, the script says so and still reports ours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # compute.py

PROMPTS = [
    "Explain how a rainbow forms.", "Write a short poem about autumn leaves.",
    "What are three tips for learning a new language?", "Summarise the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?", "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?", "Describe a good morning routine.",
    "Why is the sky blue?", "How do vaccines work?", "Write a haiku about the sea.",
    "What should I pack for a weekend camping trip?", "Explain recursion to a beginner.",
    "What causes the seasons?", "Suggest a name for a friendly robot.", "How do bees make honey?",
]

# Runs inside the TRL 1.12 venv: arguments come as one JSON document on argv[1].
TRL_WORKER = textwrap.dedent('''
    import json, statistics, sys, time, tempfile
    import torch
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(cfg["policy"], padding_side="left")
    # SmolLM2 pads with its EOS (<|im_end|>), which also ends every chat turn inside the prompt; TRL
    # infers masks from the pad id, so give it a pad token that never occurs (<|endoftext|>).
    tok.pad_token = "<|endoftext|>"
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for p in cfg["prompts"]]
    train = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(cfg["policy"])
    ref = AutoModelForCausalLM.from_pretrained(cfg["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1)
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = tok.pad_token_id
    policy.generation_config.pad_token_id = tok.pad_token_id

    class Clock(TrainerCallback):
        def __init__(self):
            self.t = [time.perf_counter()]
        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())

    clock = Clock()
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=cfg["batch_size"] // cfg["minibatch_size"], num_ppo_epochs=cfg["ppo_epochs"],
        response_length=cfg["response_length"], temperature=cfg["temperature"], stop_token="eos",
        total_episodes=cfg["batch_size"] * cfg["steps"], local_rollout_forward_batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"], kl_coef=cfg["kl_coef"], seed=cfg["seed"], num_sample_generations=0,
        report_to="none", bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train, eval_dataset=train.select(range(2)),
                         callbacks=[clock])
    clock.t = [time.perf_counter()]
    trainer.train()
    steps = [b - a for a, b in zip(clock.t, clock.t[1:])]
    print("RESULT " + json.dumps({"trl": trl.__version__, "step_seconds": steps}))
''')


def build_models(root: Path) -> tuple[str, str]:
    from cai.testing import build_tiny_model

    # head_dim 64 (vLLM's CPU attention has no kernel for the default tiny head_dim of 16)
    shape = {"hidden": 128, "heads": 2, "kv_heads": 1}
    return (str(build_tiny_model(root / "policy", "policy", seed=0, **shape)),
            str(build_tiny_model(root / "reward", "reward", seed=1, **shape)))


def run_ours(policy: str, reward_path: str, a: argparse.Namespace, engine: str = "transformers") -> dict:
    import torch

    from cai.ppo import PPOConfig, PPOTrainer, RewardModelReward

    torch.set_num_threads(a.threads)
    cfg = PPOConfig(policy=policy, reward=reward_path, steps=a.steps, batch_size=a.batch_size,
                    minibatch_size=a.minibatch_size, ppo_epochs=a.ppo_epochs, max_new_tokens=a.response_length,
                    temperature=a.temperature, learning_rate=a.learning_rate, kl_coef=a.kl_coef, target_kl=None,
                    seed=a.seed, threads=a.threads, rollout_engine=engine, device="cpu",
                    # as TRL does it: one sample per prompt, scores used as they come
                    samples_per_prompt=1, normalize_reward=False)
    reward = RewardModelReward(reward_path, "bench-reward", torch.device("cpu"), batch_size=a.batch_size)
    trainer = PPOTrainer(cfg, policy, policy, reward_path, reward, torch.device("cpu"))
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    steps, parts = [], []
    for s in range(a.steps):
        batch = [convs[(s * a.batch_size + i) % len(convs)] for i in range(a.batch_size)]
        t0 = time.perf_counter()
        m, _ = trainer.step(batch, seed=a.seed + s)
        steps.append(time.perf_counter() - t0)
        parts.append({k: m[k] for k in ("generation_seconds", "scoring_seconds", "training_seconds")})
    return {"step_seconds": steps, "parts": parts}


def ensure_trl_venv(venv: Path, transformers_version: str) -> Path:
    """Create (or reuse) the throw-away environment with TRL 1.12; returns its python."""
    py = venv / "bin" / "python"
    stamp = venv / ".cai-bench-ready"
    if stamp.exists():
        return py
    print(f"creating {venv} with torch==2.13.0, trl==1.12.*, transformers=={transformers_version} "
          "(a few minutes, once)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch first, pinned: it is the local CPU build; an open range could pull a multi-GB CUDA build.
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "trl==1.12.*", f"transformers=={transformers_version}", "accelerate", "datasets",
                    "pandas", "rich"], check=True)
    stamp.write_text(time.strftime("%F %T"))
    return py


def run_trl(py: Path, policy: str, reward: str, a: argparse.Namespace) -> dict:
    cfg = {"policy": policy, "reward": reward, "prompts": PROMPTS, "batch_size": a.batch_size,
           "minibatch_size": a.minibatch_size, "ppo_epochs": a.ppo_epochs, "response_length": a.response_length,
           "temperature": a.temperature, "steps": a.steps, "learning_rate": a.learning_rate, "kl_coef": a.kl_coef,
           "seed": a.seed, "threads": a.threads}
    with tempfile.NamedTemporaryFile("w", suffix="_trl_ppo_worker.py", delete=False) as f:
        f.write(TRL_WORKER)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(a.threads),
           "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([str(py), f.name, json.dumps(cfg)], capture_output=True, text=True, env=env,
                         timeout=a.trl_timeout)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"TRL worker exited {out.returncode}:\n{(out.stderr or out.stdout)[-3000:]}")


def per_step(result: dict, warmup: int) -> float:
    timed = result["step_seconds"][warmup:] or result["step_seconds"]
    return statistics.median(timed)


def describe(result: dict, warmup: int) -> str:
    parts = result["parts"][warmup:] or result["parts"]
    split = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return (f"{per_step(result, warmup):.3f} s/step (generation {split['generation_seconds']:.3f}, "
            f"scoring {split['scoring_seconds']:.3f}, training {split['training_seconds']:.3f})")


def step_flops(policy: str, reward: str, a: argparse.Namespace) -> float:
    """Estimated FLOPs of one PPO step, the same for every trainer: ``T`` = batch x (mean prompt +
    response tokens); inference 2 x params x T for the rollout, the old and the reference policy's
    log-probs, the reward and the values; training 6 x params x T per PPO epoch for policy and critic."""
    from compute import forward_flops, n_params, train_flops
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    prompt = statistics.fmean(len(tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                              add_generation_prompt=True),
                                      add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    tokens = round(a.batch_size * (prompt + a.response_length))
    pp, pr = n_params(policy), n_params(reward)
    return forward_flops(3 * pp + 2 * pr, tokens) + a.ppo_epochs * train_flops(pp + pr, tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1, help="First steps not counted.")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--minibatch-size", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--learning-rate", type=float, default=3e-6)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1 is fastest on a busy box).")
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "cai-bench-ppo-models-hd64")
    ap.add_argument("--trl-venv", type=Path, default=Path(tempfile.gettempdir()) / "cai-bench-trl112")
    ap.add_argument("--trl-timeout", type=int, default=1800)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="Also time ours with vLLM rollouts.")
    ap.add_argument("--policy", help="Policy folder instead of the tiny one (e.g. data/models/sft-...).")
    ap.add_argument("--reward", help="Reward model folder (also the critic's start) instead of the tiny one.")
    a = ap.parse_args()
    if a.batch_size % a.minibatch_size:
        ap.error("--batch-size must be a multiple of --minibatch-size")

    import transformers

    if bool(a.policy) != bool(a.reward):
        ap.error("--policy and --reward go together")
    policy, reward = (a.policy, a.reward) if a.policy else build_models(a.models_dir)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, threads={a.threads}")
    kind = "" if a.policy else "tiny Llama "
    print(f"models: {kind}policy {policy} and reward/critic {reward}")
    print(f"setup: {a.steps} steps ({a.warmup} warm-up), batch {a.batch_size}, minibatch {a.minibatch_size}, "
          f"{a.ppo_epochs} epochs, response length {a.response_length}, temperature {a.temperature}\n", flush=True)

    results: dict[str, float] = {}
    ours = run_ours(policy, reward, a)
    results["ours (transformers rollouts)"] = per_step(ours, a.warmup)
    print(f"ours: {describe(ours, a.warmup)}", flush=True)

    if a.vllm:
        try:
            v = run_ours(policy, reward, a, engine="vllm")
            results["ours (vLLM rollouts)"] = per_step(v, a.warmup)
            print(f"ours with vLLM rollouts (weights reloaded every step): {describe(v, a.warmup)}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"vLLM rollouts could not run here: {type(e).__name__}: {str(e)[:500]}", flush=True)

    trl_note = None
    if a.skip_trl:
        trl_note = "skipped (--skip-trl)"
    else:
        try:
            py = ensure_trl_venv(a.trl_venv, transformers.__version__)
            trl = run_trl(py, policy, reward, a)
            key = f"TRL {trl['trl']} PPOTrainer"
            results[key] = per_step(trl, a.warmup)
            print(f"{key}: {results[key]:.3f} s/step", flush=True)
        except Exception as e:  # noqa: BLE001 - the point is to say so and still report ours
            trl_note = f"TRL 1.12's PPOTrainer could not be installed or run here: {type(e).__name__}: {e}"
            print(trl_note, flush=True)

    base = results["ours (transformers rollouts)"]
    print("\n| trainer | s/step | ratio to ours |\n|---|---|---|")
    for name, sec in results.items():
        print(f"| {name} | {sec:.3f} | {sec / base:.2f}x |")
    if trl_note:
        print(f"\nTRL: {trl_note}")
    from compute import matmul_peak, print_share

    flops, peak = step_flops(policy, reward, a), matmul_peak()
    for name, sec in results.items():
        print_share(f"compute per step ({name})", flops, sec, peak)
    trl_keys = [k for k in results if k.startswith("TRL")]
    if trl_keys:
        print(f"\nours is {results[trl_keys[0]] / base:.2f}x faster per step than {trl_keys[0]} (TRL s/step / ours)")


if __name__ == "__main__":
    main()
