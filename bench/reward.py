"""Reward-model training throughput: our trainer (cai/reward.py) vs TRL's RewardTrainer.

Both train the same model (same initial weights: the same folder and seed), on the same pairs
(human-labelled PandaLM pairs; the chosen response is ``a`` with label 1.0, so the soft-label
loss equals TRL's hard-label loss), with the same batch size, max length, learning rate,
schedule (cosine, no warm-up), gradient clipping, float32 and no gradient checkpointing, for the
same number of optimizer steps, in one process. Pairs longer than ``--max-length`` tokens are
dropped beforehand, because TRL drops them while we truncate them.

Timed: the training loop only (ours: ``loop_seconds``, which includes writing metrics to DuckDB;
TRL: ``train_runtime`` of ``trainer.train()``). Not timed: loading the model, tokenising, saving.

    .venv/bin/python bench/reward.py                       # tiny model, 64 pairs
    .venv/bin/python bench/reward.py --model smollm2-135m-instruct --pairs 32 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # compute.py
DEFAULT_PAIRS = REPO.parent / "shared" / "data" / "pandalm_test.jsonl"


def load_pairs(path: Path, n: int, tokenizer, max_length: int, seed: int):
    """``n`` human pairs that fit in ``max_length`` tokens (both responses), in a seeded order."""
    from cai.rm import encode, read_pairs

    pairs = read_pairs(path)
    random.Random(seed).shuffle(pairs)
    out = []
    for p in pairs:
        ids, _ = encode(tokenizer, [p.messages] * 2, [p.chosen, p.rejected], max_length=10**9)
        if max(len(x) for x in ids) <= max_length:
            out.append(p)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} pairs of {path} fit in {max_length} tokens; lower --pairs")


def run_ours(model_path: str, pairs, args, workdir: Path) -> dict:
    from cai.reward import RewardConfig, train_reward
    from cai.store import Store, content_hash

    store = Store(workdir / "bench.duckdb")
    prompts, comparisons = {}, []
    for p in pairs:
        pid = content_hash(p.messages)
        prompts[pid] = {"prompt_id": pid, "messages": json.dumps(p.messages), "prompt_text": p.messages[-1]["content"]}
        comparisons.append({"comparison_id": content_hash("bench", p.id), "prompt_id": pid, "response_a": p.chosen,
                            "response_b": p.rejected, "p_a": 1.0, "status": "ok", "judge_spec_hash": "human"})
    store.insert("prompts", list(prompts.values()))
    store.insert("comparisons", comparisons)
    cfg = RewardConfig(base_model=model_path, lr=args.lr, batch_size=args.batch_size, max_steps=args.steps,
                       max_length=args.max_length, val_fraction=0.0, warmup_ratio=0.0, min_lr_ratio=0.0,
                       mixed_precision="no", seed=args.seed, eval_every=10**6, save_every=10**6, log_every=10,
                       output_dir=str(workdir / "ours"))
    summary = train_reward(store, cfg, progress=False)
    return {"seconds": summary["loop_seconds"], "pairs": summary["pairs_trained"], "steps": summary["steps"]}


def run_trl(model_path: str, pairs, args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from cai.rm import load_sequence_classifier, load_tokenizer

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)  # the same new score head as ours (seed, then load)
    tokenizer = load_tokenizer(model_path)
    model = load_sequence_classifier(model_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    data = Dataset.from_list([{"prompt": p.messages, "chosen": [{"role": "assistant", "content": p.chosen}],
                               "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
    trl_args = TRLRewardConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
        max_length=args.max_length, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, seed=args.seed,
        dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=trl_args, train_dataset=data, processing_class=tokenizer)
    out = trainer.train()
    return {"seconds": out.metrics["train_runtime"], "pairs": args.steps * args.batch_size, "steps": out.global_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (built on the fly), a built-in name or an HF folder")
    ap.add_argument("--data", type=Path, default=DEFAULT_PAIRS)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    args.steps = args.pairs // args.batch_size

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from cai.models import resolve
    from cai.rm import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.model == "tiny":
            from cai.testing import build_tiny_model

            model_path = str(build_tiny_model(workdir / "tiny", "reward", hidden=64))
        else:
            model_path = resolve(args.model)
        pairs = load_pairs(args.data, args.pairs, load_tokenizer(model_path), args.max_length, args.seed)
        print(f"model {args.model} ({model_path}); {len(pairs)} pairs from {args.data.name}; batch {args.batch_size}; "
              f"{args.steps} steps; max_length {args.max_length}; threads {torch.get_num_threads()}; "
              f"device {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
        results = {}
        for name, fn in [("cai", run_ours), ("trl", run_trl)]:
            t = time.time()
            results[name] = r = fn(model_path, pairs, args, workdir)
            r["pairs_per_second"] = r["pairs"] / r["seconds"]
            print(f"{name:>4}: {r['pairs']} pairs in {r['seconds']:.2f}s = {r['pairs_per_second']:.2f} pairs/s "
                  f"({r['steps']} steps; {time.time() - t:.1f}s with setup)", flush=True)
        ratio = results["cai"]["pairs_per_second"] / results["trl"]["pairs_per_second"]
        print(f"ratio cai / trl: {ratio:.2f}x")
        # Share of the compute peak: 6 x parameters x the (unpadded) tokens of both responses of every
        # pair trained; pairs are drawn in turn, so a trained pair has the mean pair's tokens.
        from compute import matmul_peak, n_params, print_share, train_flops

        from cai.rm import encode

        tok = load_tokenizer(model_path)
        per_pair = [sum(len(x) for x in encode(tok, [p.messages] * 2, [p.chosen, p.rejected],
                                               max_length=args.max_length)[0]) for p in pairs]
        mean_tokens, params, peak = sum(per_pair) / len(per_pair), n_params(model_path), matmul_peak()
        for name, r in results.items():
            print_share(f"compute ({name})", train_flops(params, round(r["pairs"] * mean_tokens)), r["seconds"], peak)


if __name__ == "__main__":
    main()
