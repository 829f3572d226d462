"""Critique-and-revise throughput: revisions per second for the whole batch, transformers vs vLLM.

One run, one machine, the same inputs: the demo prompts are ingested into a temporary store, the
embedded model writes the initial responses once (transformers, greedy), and the store file is
copied so that each engine runs the full ``cai critique`` stage (``run_critique``: every round's
critiques in one engine call, every round's revisions in another, cleaning, statuses, writes) on
identical generations. Model loading and a short warm-up are not timed. Greedy decoding by default,
so both engines do nearly the same work; the ratio is vLLM over transformers.

    .venv/bin/python bench/critique.py                       # 16 generations, 2 rounds
    .venv/bin/python bench/critique.py --generations 64 --rounds 1 --skip-transformers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # compute.py


def prepare(workdir: Path, args) -> Path:
    """A store with ``args.generations`` initial responses of the model; returns its path."""
    from cai.generate import GenerateConfig, run_generate
    from cai.ingest import ingest_file
    from cai.store import Store

    store = Store(workdir / "base.duckdb")
    for f in sorted((REPO / "data" / "prompts").glob("*.jsonl")):
        ingest_file(store, f, test_fraction=0.0)
    run_generate(store, GenerateConfig(model=args.model, temperature=0.0, max_tokens=args.initial_max_tokens,
                                       limit=args.generations), progress=False)
    return store.path


def bench_engine(kind: str, engine, base_db: Path, workdir: Path, args) -> dict:
    from cai.critique import CritiqueConfig, run_critique
    from cai.engines import SamplingParams
    from cai.store import Store

    engine.chat([[{"role": "user", "content": "Say hi."}]] * 2, SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    db = workdir / f"{kind}.duckdb"
    shutil.copy(base_db, db)
    store = Store(db)
    cfg = CritiqueConfig(model=args.model, engine=kind, constitution=args.constitution, rounds=args.rounds,
                         few_shot=args.few_shot, temperature=args.temperature,
                         critique_max_tokens=args.critique_max_tokens, revision_max_tokens=args.revision_max_tokens)
    from compute import EngineTokens

    with EngineTokens() as counted:  # every critique and revision request: prompt + generated tokens
        t0 = time.perf_counter()
        summary = run_critique(store, cfg, engine=engine, progress=False)
        seconds = time.perf_counter() - t0
    texts = {(r["generation_id"], r["round"]): r["raw_revision"]
             for r in store.query("SELECT generation_id, round, raw_revision FROM revisions")}
    return {"engine": kind, "revisions": summary["revised"], "seconds": round(seconds, 2),
            "revisions_per_second": round(summary["revised"] / seconds, 3),
            "tokens": summary["tokens"], "tokens_per_second": round(summary["tokens"] / seconds, 1),
            "status": summary["status"], "texts": texts, "flops": counted.flops()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--constitution", default=str(REPO / "constitutions" / "harmless.yaml"))
    ap.add_argument("--generations", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--few-shot", type=int, default=None, help="constitution examples placed first (default all)")
    ap.add_argument("--initial-max-tokens", type=int, default=64)
    ap.add_argument("--critique-max-tokens", type=int, default=48)
    ap.add_argument("--revision-max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--hf-batch-size", type=int, default=16, help="transformers engine batch size")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()

    from cai.engines import make_engine
    from cai.models import resolve

    path = resolve(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="cai-bench-critique-"))
    print(f"model {args.model}; {args.generations} generations x {args.rounds} rounds; critique "
          f"{args.critique_max_tokens} / revision {args.revision_max_tokens} max tokens; temperature "
          f"{args.temperature}; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})", flush=True)
    t0 = time.perf_counter()
    base_db = prepare(workdir, args)
    print(f"initial responses written in {time.perf_counter() - t0:.1f}s", flush=True)

    results = []
    try:
        if not args.skip_transformers:
            hf = make_engine("transformers", path, batch_size=args.hf_batch_size, progress=False)
            results.append(bench_engine("transformers", hf, base_db, workdir, args))
            hf.close()
            print(f"transformers: {results[-1]['seconds']}s", flush=True)
        if not args.skip_vllm:
            vl = make_engine("vllm", path, progress=False)
            results.append(bench_engine("vllm", vl, base_db, workdir, args))
            vl.close()
            print(f"vllm: {results[-1]['seconds']}s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'engine':<14}{'revisions':>10}{'seconds':>10}{'rev/s':>10}{'tok/s':>10}  statuses")
    for r in results:
        print(f"{r['engine']:<14}{r['revisions']:>10}{r['seconds']:>10}{r['revisions_per_second']:>10}"
              f"{r['tokens_per_second']:>10}  {r['status']}")
    if len(results) == 2:
        hf_r, vl_r = results
        same = sum(hf_r["texts"].get(k) == v for k, v in vl_r["texts"].items())
        print(f"\nvLLM / transformers: {vl_r['revisions_per_second'] / hf_r['revisions_per_second']:.2f}x revisions/s; "
              f"{same}/{len(vl_r['texts'])} revisions identical between engines")
    from compute import matmul_peak, print_share

    peak = matmul_peak() if results else None
    for r in results:  # 2 x parameters x (prompt + generated) tokens of every engine call
        r["compute_share"] = print_share(f"compute ({r['engine']})", r["flops"], r["seconds"], peak)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "texts"} for r in results], indent=2))


if __name__ == "__main__":
    main()
