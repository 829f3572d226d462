"""`cai ingest-preferences`: every accepted shape, bad rows, re-imports, and where human rows show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.preferences import HUMAN_TAG, PreferenceImportError, import_preferences, parse_transcript
from cai.store import Store

CONV = [{"role": "user", "content": "How do I boil an egg?"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def shapes_dir(tmp_path) -> Path:
    write_jsonl(tmp_path / "ours.jsonl", [
        {"id": "p-1", "prompt": CONV, "chosen": "Simmer it for 8 minutes.", "rejected": "",
         "votes": [1, 0, 1], "agreement": "2/3", "cmp_key": "x_y"},
        {"id": "p-2", "prompt": CONV, "chosen": "Put it in boiling water.", "rejected": "Microwave it whole.",
         "agreement": "3/3", "subset": "cooking"},
    ])
    write_jsonl(tmp_path / "trl_text.jsonl", [
        {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"},
        # TRL's HH text format: the prompt is a transcript ending with the empty Assistant turn.
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:",
         "chosen": " Blue.", "rejected": " Seven."},
    ])
    write_jsonl(tmp_path / "trl_conv.jsonl", [
        {"prompt": CONV, "chosen": [{"role": "assistant", "content": "Boil 8 min."}],
         "rejected": [{"role": "assistant", "content": "No idea."}]},
        {"chosen": [*CONV, {"role": "assistant", "content": "Boil 9 min."}],
         "rejected": [*CONV, {"role": "assistant", "content": "Fry it."}]},
    ])
    write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: Locked out.\n\nAssistant: "
                   "Call a locksmith.",
         "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: Locked out.\n\nAssistant: "
                     "Use a bobby pin like this..."},
    ])
    return tmp_path


def test_parse_transcript():
    assert parse_transcript("\n\nHuman: a b\n\nAssistant: c\n\nHuman: d", "chosen") == [
        {"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]


def test_every_shape_imported(store: Store, shapes_dir: Path):
    files = [shapes_dir / f for f in ("ours.jsonl", "trl_text.jsonl", "trl_conv.jsonl", "hh.jsonl")]
    s = import_preferences(store, files)
    assert s.pairs == 7 and s.comparisons_new == 7 and s.duplicates_in_file == 0
    assert s.shapes == {"messages": 2, "trl_text": 1, "hh_transcript": 2, "trl_conversational": 1,
                        "trl_implicit": 1}
    # Four distinct prompts: the egg question (in three files), the prime, the colour, the lock.
    assert s.prompts_new == 4
    rows = store.query("SELECT * FROM comparisons ORDER BY judge_name, response_a")
    assert {r["method"] for r in rows} == {"human"} and {r["pair_kind"] for r in rows} == {"human"}
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["position_consistent"] for r in rows} == {None}
    by_a = {r["response_a"]: r for r in rows}
    # Votes [1, 0, 1]: two for the chosen response, one tie counted half -> 2.5 / 3.
    assert by_a["Simmer it for 8 minutes."]["p_a"] == pytest.approx(2.5 / 3)
    assert by_a["Simmer it for 8 minutes."]["response_b"] == ""  # one empty reply is a real answer
    assert by_a["Put it in boiling water."]["p_a"] == 1.0  # agreement 3/3
    assert by_a["7"]["p_a"] == 1.0 and by_a["7"]["judge_name"] == "human:trl_text"
    params = json.loads(by_a["Put it in boiling water."]["params"])
    assert params == {"source": "ours", "file": str(shapes_dir / "ours.jsonl"), "line": 2, "id": "p-2",
                      "subset": "cooking"}
    assert json.loads(by_a["Simmer it for 8 minutes."]["raw_output"])["fields"]["cmp_key"] == "x_y"
    lock = by_a["Call a locksmith."]
    assert lock["response_b"] == "Use a bobby pin like this..." and lock["judge_name"] == "human:hh"
    messages = json.loads(store.scalar("SELECT messages FROM prompts WHERE prompt_id = ?", [lock["prompt_id"]]))
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and messages[-1]["content"] == "Locked out."
    colour = json.loads(store.scalar("SELECT messages FROM prompts WHERE prompt_id = ?",
                                     [by_a["Blue."]["prompt_id"]]))
    assert colour[-1] == {"role": "user", "content": "Name a colour."} and by_a["Blue."]["response_b"] == "Seven."
    assert by_a["Boil 9 min."]["prompt_id"] == by_a["Boil 8 min."]["prompt_id"]

    # Human rows are visible in their own view, not among the AI judge's preferences, and their
    # prompts are not the policy's prompts.
    assert store.scalar("SELECT count(*) FROM preferences") == 0
    view = store.query("SELECT * FROM human_preferences WHERE chosen = 'Put it in boiling water.'")[0]
    assert view["source"] == "ours" and view["line"] == 2 and view["subset"] == "cooking"
    assert view["external_id"] == "p-2" and view["probability"] == 1.0
    assert store.scalar("SELECT count(*) FROM human_preferences") == 7
    tags = store.query("SELECT tags FROM prompts")
    assert all(HUMAN_TAG in r["tags"] for r in tags)
    from cai.generate import select_prompts

    assert select_prompts(store) == []
    # Nor does `cai evaluate` share its prompts among their (empty) category.
    from cai.evaluate import EvaluateConfig, _selections
    from cai.ingest import ingest_file

    red = shapes_dir / "red.jsonl"
    write_jsonl(red, [{"prompt": f"q{i}", "category": "red_team", "split": "test"} for i in range(3)])
    ingest_file(store, red)
    assert _selections(store, EvaluateConfig(limit=2)) == [("red_team", 2)]
    assert len(select_prompts(store)) == 3

    # The same files again: nothing new.
    again = import_preferences(store, files)
    assert again.comparisons_new == 0 and again.prompts_new == 0 and again.comparisons_present == 7
    assert store.scalar("SELECT count(*) FROM comparisons") == 7


def test_parquet_and_source_override(store: Store, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
        {"prompt": "Capital of Italy?", "chosen": "Rome", "rejected": "Milan"},
    ]), tmp_path / "caps.parquet")
    s = import_preferences(store, [tmp_path / "caps.parquet"], source="gold")
    assert s.comparisons_new == 2 and s.judge_names == ["human:gold"]
    assert store.scalar("SELECT count(*) FROM human_preferences WHERE source = 'gold'") == 2


def test_bad_rows_named_and_nothing_written(store: Store, shapes_dir: Path):
    bad = write_jsonl(shapes_dir / "bad.jsonl", [
        {"prompt": "ok", "chosen": "a", "rejected": "b"},
        '{"prompt": "broken json", ',
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": 5, "rejected": "b"},
        {"prompt": [{"role": "user", "content": "  "}], "chosen": "a", "rejected": "b"},
        {"chosen": "no transcript here", "rejected": "nor here"},
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "votes": [1, 2]},
        {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
    ])
    with pytest.raises(PreferenceImportError) as e:
        import_preferences(store, [shapes_dir / "ours.jsonl", bad])  # a good file and a bad one
    msg = str(e.value)
    assert "nothing was written" in msg
    for expected in (f"{bad}:2: <file>: not valid JSON", f"{bad}:3: rejected: missing",
                     f"{bad}:4: chosen: must be the response as text", f"{bad}:5: prompt: the last user message is empty",
                     f"{bad}:6: chosen: no prompt field", f"{bad}:7: rejected: its transcript differs",
                     f"{bad}:8: rejected: is the same text", f"{bad}:9: votes: [1, 2] has no majority",
                     f"{bad}:10: prompt[0]: the last message must be from the user"):
        assert expected in msg, expected
    assert f"{bad}:1:" not in msg
    assert len(e.value.problems) == 9
    # Nothing of either file was stored.
    assert store.scalar("SELECT count(*) FROM comparisons") == 0
    assert store.scalar("SELECT count(*) FROM prompts") == 0
    with pytest.raises(PreferenceImportError, match="no such file"):
        import_preferences(store, [shapes_dir / "missing.jsonl"])


def test_cli(tmp_path: Path, shapes_dir: Path):
    from typer.testing import CliRunner

    from cai.cli import app

    db = tmp_path / "cli.duckdb"
    ok = CliRunner().invoke(app, ["ingest-preferences", str(shapes_dir / "hh.jsonl"), str(shapes_dir / "ours.jsonl"),
                                  "--source", "mine", "--db", str(db)])
    assert ok.exit_code == 0, ok.output
    assert "3 pairs from 2 file(s) as human:mine" in ok.stdout and "3 new comparisons" in ok.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a"}])
    result = CliRunner().invoke(app, ["ingest-preferences", str(bad), "--db", str(db)])
    assert result.exit_code == 1 and f"{bad}:1: rejected: missing" in result.stderr
    assert "nothing was written" in result.stderr
    assert Store(db).scalar("SELECT count(*) FROM comparisons") == 3
