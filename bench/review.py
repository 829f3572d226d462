"""Load times of the review page (`cai review`) on a store with 10,000 comparisons.

Builds a store (real ingest of the demo prompts; 10,000 comparisons over them with texts of a few
hundred characters, the shipped constitution's principles and some human verdicts), starts the real
server process, and times over HTTP (median of ``--repeats``):

* the page as it opens: the HTML, JS and CSS, ``/api/info`` (filter choices), the first page of
  pairs and the first pair's detail;
* a deep page (the last one), a filtered and sorted page, a pair's detail;
* the baseline, measured in the same run: a page without server-side paging, i.e. every
  comparison with its texts read from the store and encoded as JSON (done in this process, so no
  HTTP cost is even counted against it).

    .venv/bin/python bench/review.py                     # 10,000 comparisons
    .venv/bin/python bench/review.py --pairs 50000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # compute.py
BIN = Path(sys.executable).parent


def build_store(path: Path, n_pairs: int, seed: int) -> None:
    from cai.constitution import load_constitution
    from cai.ingest import ingest_file
    from cai.store import Store, content_hash, insert_rows, now

    store = Store(path)
    for f in ("red_team.jsonl", "helpful.jsonl"):
        ingest_file(store, REPO / "data" / "prompts" / f)
    constitution = load_constitution(REPO / "constitutions" / "harmless.yaml")
    store.register_constitution(constitution)
    prompts = [r["prompt_id"] for r in store.query("SELECT prompt_id FROM prompts ORDER BY prompt_id")]
    principles = [p.id for p in constitution.principles]
    rng = random.Random(seed)
    words = ["the", "response", "should", "explain", "why", "it", "is", "safer", "to", "ask", "a", "doctor",
             "and", "never", "help", "hurt", "anyone", "<script>alert(1)</script>"]
    rows, stamp = [], now()
    for i in range(n_pairs):
        a, b = f"gen-{i}-a", f"gen-{i}-b"
        p_first, p_swapped = rng.random(), rng.random()
        pr = rng.choice(principles)
        rows.append({
            "comparison_id": content_hash("bench", i), "prompt_id": rng.choice(prompts),
            "pair_kind": rng.choice(["initial_vs_revised", "two_samples"]), "response_a_id": a,
            "response_b_id": b, "response_a": " ".join(rng.choices(words, k=70)),
            "response_b": " ".join(rng.choices(words, k=70)), "principle_ids": [pr],
            "constitution_hash": constitution.hash, "judge_name": "multiple-choice", "judge_spec_hash": "bench",
            "judge_model_id": "bench", "judge_engine": "transformers", "method": "multiple_choice",
            "p_a_first": p_first, "p_a_swapped": p_swapped, "p_a": (p_first + p_swapped) / 2,
            "position_consistent": (p_first > 0.5) == (p_swapped > 0.5),
            "raw_output": json.dumps({"principles": [{"id": pr, "status": "ok", "p_first": p_first,
                                                      "p_swapped": p_swapped}]}),
            "status": "ok", "seed": 0, "params": "{}", "created_at": stamp,
        })
        if i % 50 == 0:  # a person reviewed every 50th pair
            rows.append({**rows[-1], "comparison_id": content_hash("bench-human", i), "pair_kind": "human",
                         "method": "human", "judge_name": "human:bench", "p_a": float(rng.random() > 0.5),
                         "p_a_first": None, "p_a_swapped": None, "position_consistent": None,
                         "principle_ids": None})
    with store.write() as con:
        for start in range(0, len(rows), 5000):
            insert_rows(con, "comparisons", rows[start:start + 5000])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, repeats: int) -> tuple[list[float], int]:
    """Seconds of each of ``repeats`` calls of ``fn()`` (after one warm-up) and the bytes it returned."""
    fn()  # warm-up (imports, DuckDB's first open)
    times, size = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        size = fn()
        times.append(time.perf_counter() - t0)
    return times, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import httpx

    from cai.store import Store

    work = Path(tempfile.mkdtemp(prefix="cai-bench-review-"))
    db = work / "cai.duckdb"
    t0 = time.time()
    build_store(db, args.pairs, args.seed)
    n = Store(db).scalar("SELECT count(*) FROM comparisons WHERE method <> 'human'")
    print(f"store: {db} with {n} AI comparisons (+ human verdicts), built in {time.time() - t0:.1f}s")

    port = free_port()
    proc = subprocess.Popen([BIN / "cai", "review", "--db", str(db), "--port", str(port), "--read-only"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        if "http://127.0.0.1" not in line:
            raise SystemExit(f"cai review did not start: {line}{proc.stdout.read()}")
        base = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=base, timeout=60)

        def get(path: str, **params) -> int:
            r = http.get(path, params=params)
            r.raise_for_status()
            return len(r.content)

        first_id = http.get("/api/pairs", params={"limit": 1}).json()["rows"][0]["comparison_id"]
        deep = (n - 1) // 50 * 50

        def page_open() -> int:
            return (get("/") + get("/static/review.js") + get("/static/review.css") + get("/api/info")
                    + get("/api/agreement") + get("/api/pairs", offset=0, limit=50, reviewer="bench")
                    + get(f"/api/pairs/{first_id}"))

        def naive() -> int:
            # What a page without server-side paging would need: every pair with its texts, as JSON.
            store = Store(db)
            rows = store.query("SELECT c.*, p.prompt_text, p.messages FROM comparisons c "
                               "JOIN prompts p USING (prompt_id) WHERE c.method <> 'human'")
            return len(json.dumps(rows, default=str))

        cases = [
            ("page opens (html+js+css, info, first 50 pairs, first pair)", page_open),
            ("first page of pairs (50)", lambda: get("/api/pairs", offset=0, limit=50)),
            (f"deep page of pairs (offset {deep})", lambda: get("/api/pairs", offset=deep, limit=50)),
            ("filtered + sorted page (orderings disagree, confidence asc)",
             lambda: get("/api/pairs", orderings_disagree="true", sort="confidence_asc", limit=50)),
            ("judge and people disagree", lambda: get("/api/pairs", people_disagree="true", limit=50)),
            ("one pair's detail", lambda: get(f"/api/pairs/{first_id}")),
            ("BASELINE: every pair with texts as JSON (no paging)", naive),
        ]
        results = {}
        print(f"{'median':>9}  {'(min-max)':>13}  {'size':>9}")
        for name, fn in cases:
            times, size = timed(fn, args.repeats)
            sec = statistics.median(times)
            results[name] = {"seconds": sec, "min": min(times), "max": max(times), "bytes": size}
            print(f"{sec * 1000:6.1f} ms  ({min(times) * 1000:5.1f}-{max(times) * 1000:5.1f})  {size / 1e3:6.1f} kB  {name}",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    base, page = results[cases[-1][0]], results[cases[0][0]]
    first, deep = results[cases[1][0]], results[cases[2][0]]
    print(f"\nbaseline / page open = {base['seconds'] / page['seconds']:.1f}x (worst case of the repeats: "
          f"{base['min'] / page['max']:.1f}x) faster with server-side paging, {base['bytes'] / page['bytes']:.0f}x "
          f"fewer bytes; deep page / first page = {deep['seconds'] / first['seconds']:.2f} "
          f"(medians of {args.repeats} after a warm-up)")
    # The review page runs no model: its work is store reads and JSON, not FLOPs, so its share of the
    # compute peak is ~0 by construction; printed like every bench's so the figures line up.
    from compute import print_share

    print_share("compute (page open; no model work, store and HTTP bound)", 0.0, page["seconds"])
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "review.json").write_text(json.dumps({"pairs": n, "repeats": args.repeats, "results": results}, indent=1))


if __name__ == "__main__":
    main()
