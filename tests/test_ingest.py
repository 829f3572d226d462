import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai.ingest import IngestError, assign_split, ingest_file


def test_demo_prompt_sets(store, demo_prompt_files):
    red, helpful = demo_prompt_files
    r1 = ingest_file(store, red)
    r2 = ingest_file(store, helpful)
    assert r1.inserted >= 100 and r2.inserted >= 100
    counts = {r["category"]: r["n"] for r in store.query("select category, count(*) n from prompts group by all")}
    assert counts["red_team"] >= 100 and counts["helpful"] >= 100
    # Re-ingesting is a no-op.
    again = ingest_file(store, red)
    assert again.inserted == 0 and again.already_present == r1.inserted
    splits = {r["split"]: r["n"] for r in store.query("select split, count(*) n from prompts group by all")}
    assert 0 < splits["test"] < splits["train"]


def test_jsonl_prompt_and_messages(store, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": 7, "prompt": "What is 2+2?", "category": "math", "tags": ["easy"], "source_url": "x"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    "split": "test"}),
        json.dumps({"prompt": "What is 2+2?"}),  # duplicate of line 1
    ]))
    r = ingest_file(store, f)
    assert (r.read, r.inserted, r.duplicates_in_file) == (3, 2, 1)
    rows = {r["prompt_text"]: r for r in store.query("select * from prompts")}
    assert rows["What is 2+2?"]["external_id"] == "7"
    assert rows["What is 2+2?"]["tags"] == ["easy"]
    assert json.loads(rows["What is 2+2?"]["meta"]) == {"source_url": "x"}
    assert rows["What is 2+2?"]["source_line"] == 1
    assert rows["Hi"]["split"] == "test"
    assert json.loads(rows["Hi"]["messages"])[0]["role"] == "system"


def test_bad_lines_reported_and_nothing_written(store, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "fine"}),
        "{not json",
        json.dumps({"prompt": ""}),
        json.dumps({"text": "wrong key"}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"prompt": "ok", "messages": []}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"prompt": "x", "split": "dev"}),
        json.dumps(["a list"]),
    ]))
    with pytest.raises(IngestError) as e:
        ingest_file(store, f)
    assert [b.line for b in e.value.bad] == [2, 3, 4, 5, 6, 7, 8, 9]
    msg = str(e.value)
    assert f"{f}:2: not valid JSON" in msg
    assert "'prompt' is empty" in msg and "exactly one of 'prompt'" in msg
    assert "last message must be from the user" in msg and "nothing was written" in msg
    assert store.scalar("select count(*) from prompts") == 0
    assert store.scalar("select count(*) from runs") == 0
    r = ingest_file(store, f, skip_invalid=True)
    assert r.inserted == 1 and len(r.skipped) == 8


def test_csv_and_parquet(store, tmp_path):
    c = tmp_path / "p.csv"
    c.write_text('prompt,category,tags\n"multi\nline prompt",helpful,"a, b"\n,helpful,\nthird,helpful,\n')
    with pytest.raises(IngestError) as e:
        ingest_file(store, c)
    assert [b.line for b in e.value.bad] == [4]  # the empty prompt, after a two-line record
    c.write_text('prompt,category,tags\n"multi\nline prompt",helpful,"a, b"\nthird,helpful,\n')
    assert ingest_file(store, c).inserted == 2
    assert store.query("select tags from prompts where prompt_text like 'multi%'")[0]["tags"] == ["a", "b"]
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["from parquet", None], "category": ["x", "y"]}), p)
    with pytest.raises(IngestError, match="row 2"):
        ingest_file(store, p)
    pq.write_table(pa.table({"prompt": ["from parquet"], "category": ["x"]}), p)
    assert ingest_file(store, p).inserted == 1


def test_unsupported_and_missing_files(store, tmp_path):
    with pytest.raises(IngestError, match="unsupported file type"):
        (tmp_path / "a.txt").write_text("x")
        ingest_file(store, tmp_path / "a.txt")
    with pytest.raises(FileNotFoundError):
        ingest_file(store, tmp_path / "nope.jsonl")


def test_split_is_deterministic():
    assert assign_split("00000000aaaa", 0.1) == "test"
    assert assign_split("ffffffffaaaa", 0.1) == "train"
