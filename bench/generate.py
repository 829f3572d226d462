"""Generation throughput: the transformers engine against the vLLM offline engine, in one run.

Both engines chat-complete the same prompts (from ``data/prompts/*.jsonl``, else a built-in set)
with the same sampling parameters; model loading and a short warm-up are not timed. Tokens/s
counts the tokens each engine generated (greedy by default, so both do nearly the same work) and
the ratio is vLLM over transformers, measured in the same run on the same machine.

    .venv/bin/python bench/generate.py
    .venv/bin/python bench/generate.py --n-prompts 32 --max-tokens 32 --temperature 0.7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BUILTIN_PROMPTS = [
    "Explain how a rainbow forms.", "Write a short poem about autumn leaves.",
    "What are three tips for learning a new language?", "Summarise the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?", "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?", "Describe a good morning routine.",
    "Why is the sky blue?", "How do vaccines work?", "Write a haiku about the sea.",
    "What should I pack for a weekend camping trip?", "Explain recursion to a beginner.",
    "What causes the seasons?", "Suggest a name for a friendly robot.", "How do bees make honey?",
]


def load_prompts(n: int) -> tuple[list[str], str]:
    files = sorted((REPO / "data" / "prompts").glob("*.jsonl"))
    prompts: list[str] = []
    for f in files:
        for line in f.open(encoding="utf-8"):
            if line.strip():
                row = json.loads(line)
                if isinstance(row.get("prompt"), str):
                    prompts.append(row["prompt"])
    source = ", ".join(str(f.relative_to(REPO)) for f in files) if prompts else "built-in prompts"
    if not prompts:
        prompts = BUILTIN_PROMPTS
    # Interleave the files' prompts evenly rather than taking the first file only.
    step = max(1, len(prompts) // n)
    picked = prompts[::step][:n]
    while len(picked) < n:
        picked += prompts[:n - len(picked)]
    return picked, source


def run(engine, convs, params) -> dict:
    engine.chat(convs[:2], params.__class__(**{**params.to_dict(), "max_tokens": 4}))  # warm-up
    from compute import EngineTokens

    with EngineTokens() as counted:  # prompt + generated tokens, for the share of the compute peak
        t0 = time.perf_counter()
        out = engine.chat(convs, params)
        seconds = time.perf_counter() - t0
    tokens = sum(c.num_tokens for samples in out for c in samples)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "flops": counted.flops(),
            "texts": [samples[0].text for samples in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="transformers engine batch size")
    ap.add_argument("--hf-threads", type=int, default=None,
                    help="torch threads for the transformers engine (default: torch's own choice)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from cai.engines import SamplingParams
    from cai.engines.hf import TransformersEngine
    from cai.engines.vllm_engine import VLLMEngine

    prompts, source = load_prompts(args.n_prompts)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens, seed=0)
    print(f"{len(prompts)} prompts from {source}; max_tokens={args.max_tokens}, "
          f"temperature={args.temperature}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")

    results = {}
    t = time.perf_counter()
    hf = TransformersEngine(args.model, batch_size=args.hf_batch_size, progress=False, num_threads=args.hf_threads)
    load_hf = time.perf_counter() - t
    results["transformers"] = run(hf, convs, params)
    results["transformers"]["load_s"] = load_hf
    import torch

    results["transformers"]["threads"] = args.hf_threads or torch.get_num_threads()
    hf.close()
    del hf

    t = time.perf_counter()
    vl = VLLMEngine(args.model, progress=False)
    load_vl = time.perf_counter() - t
    results["vllm"] = run(vl, convs, params)
    results["vllm"]["load_s"] = load_vl
    results["vllm"]["dtype"] = vl.info().details.get("dtype")
    vl.close()

    print()
    print(f"{'engine':<14}{'load s':>8}{'gen s':>9}{'tokens':>8}{'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['load_s']:>8.1f}{r['seconds']:>9.1f}{r['tokens']:>8}{r['tokens_per_s']:>10.1f}")
    print(f"(transformers: {results['transformers']['threads']} torch thread(s), batch size {args.hf_batch_size}; "
          f"vLLM: {results['vllm']['dtype']}, its own OpenMP binding)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    from compute import matmul_peak, print_share

    peak = matmul_peak()
    for name, r in results.items():  # 2 x parameters x (prompt + generated) tokens
        r["compute_share"] = print_share(f"compute ({name})", r["flops"], r["seconds"], peak)
    ratio = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    same = sum(a == b for a, b in zip(results["transformers"]["texts"], results["vllm"]["texts"], strict=True))
    print(f"\nvLLM / transformers throughput: {ratio:.2f}x")
    if args.temperature == 0:
        print(f"identical greedy texts: {same}/{len(prompts)}")
    if args.json:
        for r in results.values():
            r.pop("texts")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
