"""The generate stage on a tiny model through the real transformers engine and a real DuckDB file."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.generate import GenerateConfig, run_generate
from cai.ingest import ingest_file
from cai.models import local_model_id

CAI = str(Path(sys.executable).parent / "cai")


@pytest.fixture
def loaded(store, demo_prompt_files):
    ingest_file(store, demo_prompt_files[1])
    return store


def cfg(model, **kw):
    return GenerateConfig(model=str(model), **{"max_tokens": 8, "limit": 6, "batch_size": 4, **kw})


def test_generates_n_samples_with_lineage(loaded, tiny_policy_dir):
    summary = run_generate(loaded, cfg(tiny_policy_dir, n=3, seed=5), progress=False)
    assert summary["generated"] == 18 and summary["prompts"] == 6
    rows = loaded.query("select * from generations order by prompt_id, sample_index")
    assert len(rows) == 18
    r = rows[0]
    assert r["stage"] == "initial" and r["engine"] == "transformers"
    assert r["model_id"] == local_model_id(tiny_policy_dir)
    assert json.loads(r["params"])["max_tokens"] == 8 and r["params_hash"]
    assert len(r["token_ids"]) == len(r["logprobs"]) == r["num_tokens"] <= 8
    assert all(lp <= 0 for lp in r["logprobs"])
    assert {x["sample_index"] for x in rows} == {0, 1, 2}
    assert loaded.query("select kind from models") == [{"kind": "base"}]
    (run,) = loaded.query("select stage, status, summary from runs where stage = 'generate'")
    assert run["status"] == "ok" and json.loads(run["summary"])["generated"] == 18


def test_rerun_fills_only_what_is_missing(loaded, tiny_policy_dir):
    first = run_generate(loaded, cfg(tiny_policy_dir, limit=3), progress=False)
    assert first["generated"] == 3
    again = run_generate(loaded, cfg(tiny_policy_dir, limit=3), progress=False)
    assert again["generated"] == 0 and again["already_done"] == 3
    more = run_generate(loaded, cfg(tiny_policy_dir, limit=6), progress=False)
    assert more["generated"] == 3 and more["already_done"] == 3
    # A different sampling setting is a different set of samples, kept side by side.
    other = run_generate(loaded, cfg(tiny_policy_dir, limit=3, temperature=0.0), progress=False)
    assert other["generated"] == 3
    assert loaded.scalar("select count(*) from generations") == 9
    assert loaded.scalar("select count(distinct generation_id) from generations") == 9


def test_same_seed_same_samples(tmp_path, demo_prompt_files, tiny_policy_dir):
    from cai.store import Store

    texts = []
    for name in ["a", "b"]:
        s = Store(tmp_path / f"{name}.duckdb")
        ingest_file(s, demo_prompt_files[1])
        # Different chunking must not change the samples.
        run_generate(s, cfg(tiny_policy_dir, batch_size=2 if name == "a" else 6, seed=11), progress=False)
        texts.append([r["text"] for r in s.query("select text from generations order by generation_id")])
    assert texts[0] == texts[1]


def test_resumed_run_samples_what_an_uninterrupted_run_would(tmp_path, demo_prompt_files, tiny_policy_dir):
    """A crash leaves holes; the re-run fills them with the very samples a run without a crash makes."""
    from cai.store import Store

    def texts(s):
        return {r["generation_id"]: (r["text"], r["seed"]) for r in s.query("select * from generations")}

    whole, resumed = Store(tmp_path / "whole.duckdb"), Store(tmp_path / "resumed.duckdb")
    for s in (whole, resumed):
        ingest_file(s, demo_prompt_files[1])
    c = cfg(tiny_policy_dir, n=2, seed=4, temperature=1.0, batch_size=3)
    run_generate(whole, c, progress=False)
    run_generate(resumed, c, progress=False)
    with resumed.write() as con:  # the holes a crash would leave: a middle prompt and one sample of another
        ids = [r[0] for r in con.execute("select generation_id from generations order by prompt_id, sample_index")
               .fetchall()]
        con.execute("delete from generations where generation_id in (?, ?, ?)", [ids[4], ids[5], ids[9]])
    assert run_generate(resumed, c, progress=False)["generated"] == 3
    assert texts(resumed) == texts(whole)
    assert len({seed for _, seed in texts(whole).values()}) == 12  # one seed per sample, recorded


def test_no_prompts_is_a_clear_error(store, tiny_policy_dir):
    with pytest.raises(LookupError, match="cai ingest"):
        run_generate(store, cfg(tiny_policy_dir), progress=False)


def test_sql_answers_while_generation_is_writing(tmp_path, demo_prompt_files, tiny_policy_dir):
    """`cai sql` in one process while `cai generate` in another writes batch after batch."""
    db = tmp_path / "cai.duckdb"
    env = {**os.environ, "CAI_DB": str(db)}
    subprocess.run([CAI, "ingest", *demo_prompt_files], check=True, env=env, capture_output=True)
    writer = subprocess.Popen(
        [CAI, "generate", "--model", str(tiny_policy_dir), "--max-tokens", "24", "--batch-size", "2",
         "--limit", "40"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 300
    try:
        while writer.poll() is None and time.time() < deadline:
            out = subprocess.run([CAI, "sql", "select count(*) as n from generations", "--format", "csv"],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            seen.append(int(out.stdout.splitlines()[1]))
            time.sleep(0.5)
    finally:
        if writer.poll() is None:
            writer.kill()
    _, stderr = writer.communicate()
    assert writer.returncode == 0, stderr
    final = int(subprocess.run([CAI, "sql", "select count(*) from generations", "--format", "csv"], env=env,
                               capture_output=True, text=True).stdout.splitlines()[1])
    assert final == 40
    during = sorted({n for n in seen if 0 < n < final})
    assert len(during) >= 2, f"sql never answered mid-run: {seen}"
    assert seen == sorted(seen)  # counts only grow: each answer saw a committed batch
