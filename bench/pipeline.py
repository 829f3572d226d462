"""Where the time of a whole pipeline run goes: each stage's seconds and share of the total.

Runs the stages of a run file (default ``flows/demo.yaml``, the one ``make demo`` runs) in this
process against a fresh DuckDB file, the same way the Prefect flow does (``cai.pipeline.run_stage``,
one engine shared by the stages that use the same model), and prints a table: seconds, share of
the total, and the stage's own throughput figure where it reports one. The baseline is the total of
the same run, so the shares are comparable across machines.

    .venv/bin/python bench/pipeline.py
    .venv/bin/python bench/pipeline.py --run-file flows/demo.yaml --stages ingest,generate,critique
    .venv/bin/python bench/pipeline.py --from-db data/cai.duckdb   # each stage's latest run in a store
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # compute.py

# Summary keys that say how fast a stage went, in the order we prefer to show them.
_RATE_KEYS = ("tokens_per_second", "generations_per_second", "revisions_per_second", "pairs_per_second",
              "steps_per_second", "seconds_per_step")


def report(rows: list[tuple[str, float, str]]) -> None:
    total = sum(s for _, s, _ in rows) or 1.0
    print(f"{'stage':<10} {'seconds':>9} {'share':>7}  throughput")
    for stage, seconds, rate in rows:
        print(f"{stage:<10} {seconds:>9.1f} {seconds / total:>6.1%}  {rate}")
    print(f"{'total':<10} {total:>9.1f} {1:>6.0%}")


def rate_of(summary: dict) -> str:
    for k in _RATE_KEYS:
        if k in summary and summary[k] is not None:
            return f"{k}={summary[k]}"
    return ""


def stage_flops(counted, summary: dict) -> tuple[float, str]:
    """(estimated FLOPs of a stage, how they were counted): 2 x parameters x the tokens of every
    engine call (exact prompt + generated counts), plus 6 x parameters x the tokens trained where the
    stage reports them (tokens_per_second x train_seconds of the model at ``path``). A training
    stage that reports no token count contributes its engine calls only: a lower bound."""
    from compute import n_params, train_flops

    flops, how = counted.flops(), "engine calls"
    rate, secs, path = summary.get("tokens_per_second"), summary.get("train_seconds"), summary.get("path")
    if rate and secs and path and Path(path).is_dir():
        flops += train_flops(n_params(path), round(rate * secs))
        how += " + tokens trained"
    return flops, how


def from_db(path: Path, all_runs: bool = False) -> None:
    """Stage times recorded in a store: each stage's latest finished run (a store that saw several
    pipeline runs, or a crash and a resume, holds several runs of a stage), or their sum."""
    from cai.store import Store

    store = Store(path)
    finished = ("SELECT stage, epoch(finished_at - started_at) AS seconds, started_at FROM runs "
                "WHERE status = 'ok' AND finished_at IS NOT NULL")
    if all_runs:
        sql = f"SELECT stage, sum(seconds) AS seconds, count(*) AS runs FROM ({finished}) GROUP BY stage"
    else:
        sql = (f"SELECT stage, arg_max(seconds, started_at) AS seconds, 1 AS runs, max(started_at) AS started_at "
               f"FROM ({finished}) GROUP BY stage")
    rows = store.query(sql)
    order = ["ingest", "generate", "critique", "sft", "label", "train_rm", "ppo", "dpo", "evaluate"]
    rows.sort(key=lambda r: order.index(r["stage"]) if r["stage"] in order else 99)
    if all_runs:
        report([(r["stage"], float(r["seconds"]), f"sum of {r['runs']} run(s)") for r in rows])
    else:
        report([(r["stage"], float(r["seconds"]), f"latest run, started {r['started_at']:%Y-%m-%d %H:%M}")
                for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-file", type=Path, default=REPO / "flows" / "demo.yaml")
    ap.add_argument("--stages", help="Comma-separated subset of the run file's stages.")
    ap.add_argument("--from-db", type=Path, help="Only report the stage times recorded in this store "
                    "(each stage's latest run).")
    ap.add_argument("--all-runs", action="store_true", help="With --from-db: sum every finished run of a stage.")
    ap.add_argument("--keep", action="store_true", help="Keep the temporary store and models.")
    a = ap.parse_args()
    if a.from_db:
        from_db(a.from_db, a.all_runs)
        return

    from cai.engines import clear_engines
    from cai.pipeline import load_pipeline, run_stage
    from cai.store import Store

    cfg = load_pipeline(a.run_file)
    stages = [s for s in cfg.ordered_stages() if not a.stages or s in a.stages.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cai-bench-pipeline-"))
    store = Store(work / "cai.duckdb")
    produced: dict[str, str] = {}
    rows: list[tuple[str, float, str]] = []
    shares: list[tuple[str, float, float, str]] = []
    print(f"run file {a.run_file}, stages {', '.join(stages)}, store {store.path}", flush=True)
    from compute import EngineTokens, matmul_peak, print_share

    try:
        for stage in stages:
            with EngineTokens() as counted:
                started = time.perf_counter()
                summary = run_stage(stage, cfg, store, produced)
                seconds = time.perf_counter() - started
            rows.append((stage, seconds, rate_of(summary)))
            shares.append((stage, seconds, *stage_flops(counted, summary)))
            print(f"  {stage}: {seconds:.1f} s  {json.dumps(summary, default=str)[:200]}", flush=True)
    finally:
        clear_engines()
        if not a.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print()
    report(rows)
    peak = matmul_peak()
    for stage, seconds, flops, how in shares:
        print_share(f"compute ({stage}; {how})", flops, seconds, peak)
    print_share("compute (whole run)", sum(f for _, _, f, _ in shares), sum(s for _, s, _, _ in shares), peak)


if __name__ == "__main__":
    main()
