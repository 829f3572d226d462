"""Scale-out: the same sharded `label` on 1 and 2 Ray workers on this machine.

A store is filled once (prompts, two samples each); then, for 1 and 2 workers, a fresh copy of it
is labelled by the flow's Ray path (``runner: {kind: ray}``): the pairs are cut into the same
shards by content hash, each shard is a Prefect task on a local Ray instance with that many CPUs,
each loads the judge once and returns rows, and the driver writes them. Printed per run: pairs/s
(pairs over the stage's wall time, engine loads included), the ratio 2 workers / 1 worker, the
driver's write time as a share of the run, and the share of the machine's compute limit
(``bench/compute.py``). Both runs' rows are checked equal.

    .venv/bin/python bench/scale.py                       # tiny judge, 24 prompts, 4 shards
    .venv/bin/python bench/scale.py --model smollm2-135m-instruct --prompts 24
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def judge_tokens(store, lab, model_path: str) -> int:
    """Tokens the judge reads for every pair (all orderings and principles), counted exactly."""
    from cai.engines import get_engine
    from cai.judge import Judge, PairInput
    from cai.label import find_constitution, load_spec, principle_refs, select_pairs

    spec = load_spec(lab.judge)
    engine = get_engine("transformers", model_path)
    judge = Judge(spec, engine, principle_refs(find_constitution(lab.constitution)), seed=lab.seed)
    pairs = select_pairs(store, list(lab.pairs))
    _, queries = judge.build_queries([PairInput(f"{p['a_id']}{p['b_id']}", p["messages"], p["a_text"] or "",
                                                p["b_text"] or "") for p in pairs])
    tok = engine.tokenizer
    return sum(len(tok(engine.render(q.conversation, assistant_prefix=spec.prompt.answer_prefix),
                       add_special_tokens=False)["input_ids"]) for q in queries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="judge and policy model (default: a tiny random model on SmolLM2's tokenizer)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()

    import ray
    import yaml
    from compute import forward_flops, matmul_peak, n_params, print_share

    from cai.distributed import RunnerConfig
    from cai.generate import GenerateConfig, run_generate
    from cai.ingest import ingest_file
    from cai.label import LabelConfig
    from cai.models import resolve
    from cai.pipeline import PipelineConfig
    from cai.store import Store
    from flows.pipeline import ray_stage

    tmp = Path(tempfile.mkdtemp(prefix="cai-scale-"))
    if args.model:
        model = resolve(args.model)
    else:
        from cai.testing import build_tiny_model

        model = str(build_tiny_model(tmp / "tiny", "policy", hidden=128, layers=4))
    spec = yaml.safe_load((REPO / "judges" / "multiple-choice.yaml").read_text())
    spec.update(model=model, min_option_prob=0.0)
    (tmp / "judge.yaml").write_text(yaml.safe_dump(spec))

    base = Store(tmp / "base.duckdb")
    ingest_file(base, REPO / "data" / "prompts" / "red_team.jsonl")
    ingest_file(base, REPO / "data" / "prompts" / "helpful.jsonl")
    run_generate(base, GenerateConfig(model=model, n=2, max_tokens=48, temperature=1.0, limit=args.prompts,
                                      batch_size=16), progress=False)
    lab = LabelConfig(judge=str(tmp / "judge.yaml"), pairs=["two_samples"], batch_size=8)
    tokens = judge_tokens(base, lab, model)
    flops = forward_flops(n_params(model), tokens)
    peak = matmul_peak()
    print(f"machine: {os.cpu_count()} CPUs; judge {Path(model).name}: {n_params(model) / 1e6:.1f} M parameters; "
          f"{tokens} judge tokens; peak {peak[0] / 1e9:.1f} GFLOP/s ({peak[1]} matmul)")

    results, tables = {}, {}
    for w in [int(x) for x in args.workers.split(",")]:
        db = tmp / f"w{w}.duckdb"
        shutil.copy(base.path, db)
        cfg = PipelineConfig(db=str(db), stages=["label"], label=lab,
                             runner=RunnerConfig(kind="ray", address=None, shards=args.shards,
                                                 init_kwargs={"num_cpus": w}))
        t0 = time.time()
        summary = ray_stage("label", cfg, {})
        wall = time.time() - t0
        if ray.is_initialized():
            ray.shutdown()
        pairs = summary["labelled"]
        results[w] = {"pairs": pairs, "seconds": wall, "pairs_per_second": pairs / wall,
                      "write_share": summary["write_seconds"] / wall}
        tables[w] = {r["comparison_id"]: (r["status"], round(r["p_a"] or 0, 4))
                     for r in Store(db).query("SELECT comparison_id, status, p_a FROM comparisons")}
        print(f"{w} Ray worker(s), {args.shards} shards: {pairs} pairs in {wall:.1f} s = "
              f"{pairs / wall:.2f} pairs/s; driver writes {summary['write_seconds']:.3f} s = "
              f"{100 * results[w]['write_share']:.2f} % of the run")
        print_share(f"  compute ({w} worker(s))", flops, wall, peak)
    ws = sorted(results)
    if len(ws) > 1:
        print(f"ratio {ws[-1]} / {ws[0]} workers: {results[ws[-1]]['pairs_per_second'] / results[ws[0]]['pairs_per_second']:.2f}x"
              f" (rows identical: {tables[ws[0]] == tables[ws[-1]]})")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
