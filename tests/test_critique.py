"""The critique-and-revise stage (SL-CAI): principle sampling, conversations, cleaning rules,
statuses, batching and resumption, on a tiny model through the real transformers engine and a real
DuckDB file. (Tiny random models write gibberish: these tests check the mechanics, not quality.)
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cai.cleaning import STATUSES, classify_revision, clean_critique, clean_revision
from cai.constitution import load_constitution
from cai.critique import (
    CritiqueConfig,
    critique_conversation,
    example_turns,
    pick_principle,
    revision_conversation,
    revision_id,
    run_critique,
)
from cai.generate import GenerateConfig, run_generate
from cai.ingest import ingest_file
from cai.models import local_model_id
from cai.store import now

CAI = str(Path(sys.executable).parent / "cai")
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I pick a lock?"}]


class Recording:
    """A real engine, with every ``chat`` call recorded; optionally fails on call number ``fail_on``."""

    def __init__(self, engine, fail_on: int | None = None):
        self.engine, self.fail_on, self.calls = engine, fail_on, []

    def chat(self, conversations, params, **kw):
        self.calls.append((conversations, params))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("simulated crash")
        return self.engine.chat(conversations, params, **kw)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def engine(tiny_policy_dir):
    from cai.engines import make_engine

    e = make_engine("transformers", str(tiny_policy_dir), progress=False)
    yield e
    e.close()


@pytest.fixture(scope="module")
def constitution(constitution_path):
    return load_constitution(constitution_path)


@pytest.fixture
def generated(store, demo_prompt_files, tiny_policy_dir):
    """Five initial generations of the tiny model."""
    ingest_file(store, demo_prompt_files[0])
    run_generate(store, GenerateConfig(model=str(tiny_policy_dir), max_tokens=6, limit=5), progress=False)
    return store


def cfg(model, constitution_path, **kw) -> CritiqueConfig:
    return CritiqueConfig(model=str(model), constitution=str(constitution_path), **{
        "few_shot": 0, "critique_max_tokens": 6, "revision_max_tokens": 6, **kw})


# ---- principle sampling --------------------------------------------------------------------------
def test_principle_sampling_follows_weights_and_seeds(constitution):
    first = [pick_principle(constitution, 0, f"g{i}", 1).id for i in range(50)]
    assert first == [pick_principle(constitution, 0, f"g{i}", 1).id for i in range(50)]  # reproducible
    assert first != [pick_principle(constitution, 1, f"g{i}", 1).id for i in range(50)]  # seed matters
    assert first != [pick_principle(constitution, 0, f"g{i}", 2).id for i in range(50)]  # so does the round

    n = 8000
    counts = Counter(pick_principle(constitution, 7, f"gen-{i}", 1).id for i in range(n))
    total = sum(p.weight for p in constitution.principles)
    assert set(counts) == {p.id for p in constitution.principles}
    for p in constitution.principles:
        expected = n * p.weight / total
        sd = (expected * (1 - p.weight / total)) ** 0.5
        assert abs(counts[p.id] - expected) < 4 * sd, (p.id, counts[p.id], expected)
    heavy = [p for p in constitution.principles if p.weight > 1]
    light = [p for p in constitution.principles if p.weight == 1]
    assert heavy and light and min(counts[p.id] for p in heavy) > max(counts[p.id] for p in light)


# ---- conversations -------------------------------------------------------------------------------
def test_round_conversation_carries_few_shot_and_earlier_rounds(constitution):
    p1, p2 = constitution.principles[0], constitution.principles[1]
    shots = example_turns(constitution, constitution.examples[:1], p2)
    earlier = [{"critique_request": p1.critique, "critique": "It helps break in.", "revision_request": p1.revision,
                "revision": "I can't help with that."}]
    conv = critique_conversation(PROMPT, "Use a tension wrench.", earlier, p2, shots)
    ex = constitution.examples[0]
    assert conv[0] == PROMPT[0]  # the system message stays first
    assert [m["content"] for m in conv[1:7]] == [
        ex.prompt, ex.response, constitution.principle(ex.principle).critique, ex.critique,
        constitution.principle(ex.principle).revision, ex.revision]
    assert [m["role"] for m in conv[7:]] == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in conv[7:]] == [
        PROMPT[1]["content"], "Use a tension wrench.", p1.critique, "It helps break in.", p1.revision,
        "I can't help with that.", p2.critique]
    rev = revision_conversation(conv, "Still vague.", p2)
    assert rev[:-2] == conv and rev[-2:] == [{"role": "assistant", "content": "Still vague."},
                                              {"role": "user", "content": p2.revision}]


# ---- cleaning rules ------------------------------------------------------------------------------
CRITIQUE = "The response encourages violence and gives no safer alternative."
REQUEST = "Rewrite the assistant's response so that it gives no help with hurting anyone."


@pytest.mark.parametrize("raw, expected, rules", [
    ("Here is the revised response:\n\nTalk to him calmly.", "Talk to him calmly.", ["preamble"]),
    ("Sure! Here's a safer version of the assistant's response:\nTalk to him calmly.", "Talk to him calmly.",
     ["preamble"]),
    ("**Revised Response:** Talk to him calmly.", "Talk to him calmly.", ["preamble"]),
    ("Revision: Talk to him calmly.", "Talk to him calmly.", ["preamble"]),
    ('"Talk to him calmly."', "Talk to him calmly.", ["quotes"]),
    ("“Talk to him calmly.”", "Talk to him calmly.", ["quotes"]),
    ("Here is my rewritten answer:\n'Talk to him calmly.'", "Talk to him calmly.", ["preamble", "quotes"]),
    ("Critique: It encourages violence.\n\nRevision: Talk to him calmly.", "Talk to him calmly.",
     ["critique_leak"]),
    (CRITIQUE + "\n\nTalk to him calmly.", "Talk to him calmly.", ["critique_leak"]),
    ("The assistant's response was harmful.\n\nTalk to him calmly.", "Talk to him calmly.", ["critique_leak"]),
    ("Talk to him calmly.\n\nNote: I removed the violent suggestion.", "Talk to him calmly.", ["trailing_note"]),
    ("Talk to him calmly.\n\nThis revised response removes the violence.", "Talk to him calmly.",
     ["trailing_note"]),
    ("Assistant: Talk to him calmly.<|im_end|>", "Talk to him calmly.", ["special_tokens"]),
    (REQUEST + "\nTalk to him calmly.", "Talk to him calmly.", ["request_echo"]),
])
def test_cleaning_rules(raw, expected, rules):
    out = clean_revision(raw, critique=CRITIQUE, request=REQUEST)
    assert out.text == expected and out.rules == rules


@pytest.mark.parametrize("text", [
    "Here's a simple version of the function:\n```python\ndef f():\n    return 1\n```",  # a real answer's lead-in
    'She said "hi" and then "bye".',  # quotes inside, not around
    "Talk to him calmly.\n\nThe response you get may surprise you.",
    "Revisions are welcome: send them to the editor.",
])
def test_cleaning_leaves_ordinary_text_alone(text):
    out = clean_revision(text, critique=CRITIQUE, request=REQUEST)
    assert out.text == text.strip() and out.rules == []


def test_critique_label_is_cleaned():
    assert clean_critique("Critique: It is harmful.").text == "It is harmful."
    assert clean_critique("It is harmful.").rules == []


# ---- statuses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("revision, kw, status, reason_has", [
    ("", {}, "empty", "model wrote nothing"),
    ("", {"rules": ["quotes"]}, "empty", "after cleaning"),
    ("Use a  tension wrench", {}, "unchanged", "same text"),
    (CRITIQUE, {"critique": CRITIQUE}, "copied_critique", "repeats the critique"),
    ("I can't help with", {"finish_reason": "length", "max_tokens": 4}, "too_long", "token limit (4 tokens)"),
    ("x" * 501, {"max_chars": 500}, "too_long", "501 characters"),
    ("Please don't. " * 40, {"max_growth": 4.0}, "too_long", "as long as the response"),
    ("I can't help with that.", {"rules": ["preamble"]}, "ok", "cleaned: preamble"),
])
def test_revision_statuses(revision, kw, status, reason_has):
    got, reason = classify_revision(revision, previous="Use a tension wrench.", **kw)
    assert got == status and reason_has in reason


def test_ok_revision_without_cleaning_has_no_reason():
    assert classify_revision("I can't help with that.", previous="Use a tension wrench.") == ("ok", None)


# ---- the stage -----------------------------------------------------------------------------------
def test_rounds_are_batched_recorded_and_reported(generated, engine, tiny_policy_dir, constitution_path,
                                                  constitution):
    rec = Recording(engine)
    summary = run_critique(generated, cfg(tiny_policy_dir, constitution_path, rounds=2), engine=rec, progress=False)
    assert summary["revised"] == 10 and summary["generations"] == 5
    # One call for all critiques of a round, one for all revisions: 2 rounds -> 4 calls of 5 conversations.
    assert [len(convs) for convs, _ in rec.calls] == [5, 5, 5, 5]
    assert len({params.seed for _, params in rec.calls}) == 4
    assert [params.max_tokens for _, params in rec.calls] == [6, 6, 6, 6]

    rows = generated.query("select * from revisions order by generation_id, round")
    assert len(rows) == 10 and {r["round"] for r in rows} == {1, 2}
    for r in rows:
        p = constitution.principle(r["principle_id"])
        assert r["principle_id"] == pick_principle(constitution, 0, r["generation_id"], r["round"]).id
        assert r["critique_request"] == p.critique and r["revision_request"] == p.revision
        assert r["constitution_hash"] == constitution.hash and r["model_id"] == local_model_id(tiny_policy_dir)
        assert r["status"] in STATUSES and (r["status"] == "ok" or r["reason"])
        assert r["raw_revision"] is not None and r["revision_tokens"] >= 1 and r["engine"] == "transformers"
        params = json.loads(r["params"])
        assert params["revision"]["seed"] == r["seed"] and params["critique"]["max_tokens"] == 6
        assert r["revision_id"] == revision_id(r["generation_id"], r["round"], constitution.hash, r["model_id"],
                                               r["params_hash"])
    # Each revision call continues its critique call: + [critique written, the principle's revision request].
    round_one = {(r["critique_request"], r["critique"], r["revision_request"]) for r in rows if r["round"] == 1}
    for crit_conv, rev_conv in zip(rec.calls[0][0], rec.calls[1][0], strict=True):
        assert rev_conv[:-2] == crit_conv and [m["role"] for m in rev_conv[-3:]] == ["user", "assistant", "user"]
        assert (rev_conv[-3]["content"], rev_conv[-2]["content"], rev_conv[-1]["content"]) in round_one
    assert generated.scalar("select count(*) from principles where constitution_hash = ?", [constitution.hash]) > 0

    report = generated.query("select * from critique_report")
    assert sum(r["rounds"] for r in report) == 10
    assert all(r["ok"] + r["empty"] + r["unchanged"] + r["too_long"] + r["other"] == r["rounds"] for r in report)
    (run,) = generated.query("select status, summary from runs where stage = 'critique'")
    assert run["status"] == "ok" and sum(json.loads(run["summary"])["status"].values()) == 10


def _add_round_one(store, constitution, model_id, phash, status: str):
    """Stored round-1 rows (as an earlier run would have left them) with known texts."""
    gens = store.query("select generation_id from generations order by generation_id")
    rows = []
    for g in gens:
        p = pick_principle(constitution, 0, g["generation_id"], 1)
        rows.append({"revision_id": revision_id(g["generation_id"], 1, constitution.hash, model_id, phash),
                     "generation_id": g["generation_id"], "round": 1, "principle_id": p.id,
                     "constitution_hash": constitution.hash, "critique_request": p.critique,
                     "critique": f"CRITIQUE-1 of {g['generation_id']}", "revision_request": p.revision,
                     "revision": f"REVISION-1 of {g['generation_id']}", "status": status, "model_id": model_id,
                     "params_hash": phash, "created_at": now()})
    store.insert("revisions", rows)
    return rows


@pytest.mark.parametrize("status", ["ok", "unchanged"])
def test_round_two_builds_on_stored_round_one(generated, engine, tiny_policy_dir, constitution_path, constitution,
                                              status):
    c = cfg(tiny_policy_dir, constitution_path, rounds=2)
    model_id = local_model_id(tiny_policy_dir)
    round_one = {r["generation_id"]: r for r in _add_round_one(generated, constitution, model_id,
                                                               c.params_hash(constitution), status)}
    rec = Recording(engine)
    summary = run_critique(generated, c, engine=rec, progress=False)
    assert summary["already_done"] == 5 and summary["revised"] == 5 and len(rec.calls) == 2
    initial = {g["generation_id"]: g["text"] for g in generated.query("select generation_id, text from generations")}
    gid_order = [r["generation_id"] for r in generated.query(
        "select generation_id from revisions where round = 2 order by created_at")]
    assert sorted(gid_order) == sorted(round_one)
    for conv in rec.calls[0][0]:  # the round-2 critique conversations
        gid = next(g for g in round_one if initial[g] in [m["content"] for m in conv])
        texts = [m["content"] for m in conv]
        p2 = pick_principle(constitution, 0, gid, 2)
        assert texts[-1] == p2.critique  # the round's own principle, asked last
        carried = [round_one[gid]["critique_request"], f"CRITIQUE-1 of {gid}", round_one[gid]["revision_request"],
                   f"REVISION-1 of {gid}"]
        if status == "ok":
            assert texts[-5:-1] == carried  # round 1 is an earlier turn of the conversation
        else:
            assert f"REVISION-1 of {gid}" not in texts  # a failed round is not carried
    parents = {r["generation_id"]: r["parent_revision_id"]
               for r in generated.query("select generation_id, parent_revision_id from revisions where round = 2")}
    for gid, parent in parents.items():
        assert parent == (round_one[gid]["revision_id"] if status == "ok" else None)


def test_interrupted_run_resumes_with_missing_rounds_only(generated, engine, tiny_policy_dir, constitution_path):
    c = cfg(tiny_policy_dir, constitution_path, rounds=2)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in round 2's critique call
        run_critique(generated, c, engine=Recording(engine, fail_on=3), progress=False)
    assert generated.query("select round, count(*) as n from revisions group by round") == [{"round": 1, "n": 5}]
    (failed,) = generated.query("select run_id, status, error from runs where stage = 'critique'")
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]

    rec = Recording(engine)
    summary = run_critique(generated, c, engine=rec, progress=False)
    assert summary["already_done"] == 5 and summary["revised"] == 5 and len(rec.calls) == 2
    rows = generated.query("select round, run_id from revisions")
    assert len(rows) == 10 == generated.scalar("select count(distinct revision_id) from revisions")
    assert {r["run_id"] for r in rows if r["round"] == 1} == {failed["run_id"]}  # round 1 was not redone

    more = run_critique(generated, c.model_copy(update={"rounds": 3}), engine=engine, progress=False)
    assert more["already_done"] == 10 and more["revised"] == 5
    again = run_critique(generated, c.model_copy(update={"rounds": 3}), engine=engine, progress=False)
    assert again["revised"] == 0 and again["already_done"] == 15
    assert generated.scalar("select count(*) from revisions") == 15
    assert generated.scalar("select count(*) from runs where stage = 'critique'") == 3  # a no-op starts no run


def test_sl_cai_view_takes_the_last_ok_round(generated, tiny_policy_dir, constitution_path, constitution):
    c = cfg(tiny_policy_dir, constitution_path)
    model_id = local_model_id(tiny_policy_dir)
    phash = c.params_hash(constitution)
    _add_round_one(generated, constitution, model_id, phash, "ok")
    gid = generated.scalar("select min(generation_id) from generations")
    generated.insert("revisions", [{"revision_id": "r2", "generation_id": gid, "round": 2, "status": "too_long",
                                    "revision": "LONG", "constitution_hash": constitution.hash, "model_id": model_id,
                                    "params_hash": phash}])
    rows = {r["generation_id"]: r for r in generated.query("select * from sl_cai")}
    assert len(rows) == 5 and rows[gid]["revision"] == f"REVISION-1 of {gid}" and rows[gid]["rounds"] == 1
    assert rows[gid]["prompt"] and json.loads(rows[gid]["messages"])[-1]["role"] == "user"


def test_few_shot_examples_are_left_out_when_the_context_is_short(generated, engine, tiny_policy_dir,
                                                                  constitution_path, constitution):
    rec = Recording(engine)
    c = cfg(tiny_policy_dir, constitution_path, rounds=1, few_shot=2, limit=2, max_context=400)
    run_critique(generated, c, engine=rec, progress=False)
    examples = {ex.prompt for ex in constitution.examples}
    for conv in rec.calls[0][0]:
        assert not examples & {m["content"] for m in conv}
    reasons = [r["reason"] for r in generated.query("select reason from revisions")]
    assert all("few-shot example left out to fit the context" in r for r in reasons)
    rec = Recording(engine)
    run_critique(generated, c.model_copy(update={"max_context": 4096, "seed": 1}), engine=rec, progress=False)
    assert all(len(examples & {m["content"] for m in conv}) == 2 for conv in rec.calls[0][0])


def test_cli_critique_and_report(generated, tiny_policy_dir, constitution_path):
    env = {**os.environ, "CAI_DB": str(generated.path)}
    out = subprocess.run([CAI, "critique", "--model", str(tiny_policy_dir), "--constitution", str(constitution_path),
                          "--rounds", "1", "--few-shot", "0", "--limit", "2", "--critique-max-tokens", "4",
                          "--revision-max-tokens", "4"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert '"revised": 2' in out.stdout and "principle_id" in out.stdout
    report = subprocess.run([CAI, "critique", "--report"], capture_output=True, text=True, env=env)
    assert report.returncode == 0, report.stderr
    assert "ok_rate" in report.stdout and "of 2 rounds ok" in report.stdout


def test_no_generations_is_a_clear_error(store, tiny_policy_dir, constitution_path):
    with pytest.raises(LookupError, match="cai generate"):
        run_critique(store, cfg(tiny_policy_dir, constitution_path), progress=False)


@pytest.mark.slow
def test_embedded_model_critiques_and_revises(store, demo_prompt_files, smol_path, constitution_path):
    ingest_file(store, demo_prompt_files[0])
    run_generate(store, GenerateConfig(max_tokens=48, limit=3), progress=False)
    summary = run_critique(store, CritiqueConfig(constitution=str(constitution_path), rounds=2,
                                                 critique_max_tokens=48, revision_max_tokens=96), progress=False)
    assert summary["revised"] == 6
    rows = store.query("select * from revisions")
    assert all(r["status"] in STATUSES for r in rows)
    assert sum(bool(r["critique"].strip()) for r in rows) >= 4  # a real model writes critiques
    # The status distribution: a real instruct model keeps at least one revision of six, and every
    # rejected one says why (the reason is what `cai critique --report` aggregates).
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 1, [(r["status"], r["reason"]) for r in rows]
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    for r in ok:  # what is kept carries no announcement and is not the critique again
        assert not r["revision"].lower().startswith(("here is", "here's", "revision:", "revised response"))
        assert r["revision"] != r["critique"] and r["revision"].strip()
        assert r["finish_reason"] != "length"
