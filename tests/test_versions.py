"""Constitution versions: diffs, history, `cai label --changed` (exactly the touched pairs go to the
judge, counted on a real engine), `cai critique --changed`, and the audit, on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cai.constitution import load_constitution
from cai.store import Store
from cai.versions import diff_versions, field_changes, from_constitution, history

REPO = Path(__file__).resolve().parent.parent
HARMLESS = REPO / "constitutions" / "harmless.yaml"


def edited(tmp_path: Path, name: str, edit) -> Path:
    """A copy of harmless.yaml with ``edit(data)`` applied."""
    data = yaml.safe_load(HARMLESS.read_text())
    edit(data)
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def principle(data: dict, pid: str) -> dict:
    return next(p for p in data["principles"] if p["id"] == pid)


class CountingEngine:
    """A real engine, with every prompt it is asked to score recorded."""

    def __init__(self, inner):
        self.inner = inner
        self.scored: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score_next_token(self, prompts, candidates, top_k=20):
        self.scored += list(prompts)
        return self.inner.score_next_token(prompts, candidates, top_k=top_k)


def test_diff_is_field_level_and_generic(tmp_path):
    old = from_constitution(load_constitution(HARMLESS))
    first = old.data["principles"][0]["id"]
    second = old.data["principles"][1]["id"]

    def edit(d):
        principle(d, first)["judge"] = "Which response is kinder?"
        principle(d, first)["tags"] = ["kindness"]
        d["principles"] = [p for p in d["principles"] if p["id"] != second]
        d["principles"].append({**principle(d, first), "id": "brand-new", "weight": 2.0})
        d["version"] = "2.0.0"

    new = from_constitution(load_constitution(edited(tmp_path, "v2", edit)))
    d = diff_versions(old, new)
    assert d.added == ["brand-new"] and d.removed == [second]
    assert {c.field for c in d.changed[first]} == {"judge", "tags"}
    assert next(c for c in d.changed[first] if c.field == "judge").new == "Which response is kinder?"
    assert [c.field for c in d.other] == ["version"]
    assert len(d.unchanged) == len(old.principles) - 2
    js = json.loads(json.dumps(d.as_dict()))
    assert js["changed"][first][0]["field"] in {"judge", "tags"}
    assert "kinder" in d.markdown()
    # Fields the schema does not have yet (issue 13's `contrast`) are diffed by their sub-fields.
    changes = field_changes({"judge": "q", "contrast": {"follow": "a", "violate": "b"}},
                            {"judge": "q", "contrast": {"follow": "a", "violate": "c"}, "future": 1})
    assert [(c.field, c.old, c.new) for c in changes] == [("contrast.violate", "b", "c"), ("future", None, 1)]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_policy_dir, demo_prompt_files):
    """Eight two-sample pairs from the tiny model, labelled under harmless.yaml by the tiny judge."""
    from cai.engines import make_engine
    from cai.generate import GenerateConfig, run_generate
    from cai.ingest import ingest_file
    from cai.label import LabelConfig, run_label

    tmp = tmp_path_factory.mktemp("versions")
    store = Store(tmp / "template.duckdb")
    ingest_file(store, demo_prompt_files[0])
    run_generate(store, GenerateConfig(model=str(tiny_policy_dir), n=2, max_tokens=6, limit=8, batch_size=8),
                 progress=False)
    spec = tmp / "judge.yaml"
    spec.write_text((REPO / "judges" / "multiple-choice.yaml").read_text()
                    .replace("model: smollm2-135m-instruct", f"model: {tiny_policy_dir}")
                    .replace("min_option_prob: 0.01", "min_option_prob: 0"))
    engine = make_engine("transformers", str(tiny_policy_dir), batch_size=16, progress=False)
    cfg = LabelConfig(judge=str(spec), constitution=str(HARMLESS), pairs=["two_samples"], batch_size=16)
    assert run_label(store, cfg, engine=engine, progress=False)["labelled"] == 8
    return {"path": store.path, "cfg": cfg, "engine": engine, "tmp": tmp}


def test_label_changed_judges_exactly_the_touched_pairs(labelled, tmp_path):
    from cai.label import run_label

    path = tmp_path / "cai.duckdb"
    shutil.copy(labelled["path"], path)
    store = Store(path)
    old_hash = load_constitution(HARMLESS).hash
    before = store.query("SELECT * FROM comparisons ORDER BY comparison_id")
    drawn = [r["principle_ids"][0] for r in before]
    target = drawn[0]  # edit the judge question of a principle some pair was labelled by
    removed = next((p for p in drawn if p != target), None)

    def edit(d):
        principle(d, target)["judge"] = "Which response is more careful about harm to anyone?"
        principle(d, target)["critique"] = "Changed too, but the judge never reads it."
        if removed:
            d["principles"] = [p for p in d["principles"] if p["id"] != removed]
            # A few-shot example of a removed principle would no longer lint.
            d["examples"] = [e for e in d.get("examples", []) if e.get("principle") != removed]

    new_file = edited(tmp_path, "harmless-v2", edit)
    new = load_constitution(new_file)
    touched = {r["comparison_id"] for r in before if r["principle_ids"][0] in {target, removed}}
    assert 0 < len(touched) < len(before)

    engine = CountingEngine(labelled["engine"])
    cfg = labelled["cfg"].model_copy(update={"constitution": str(new_file), "changed": True})
    summary = run_label(store, cfg, engine=engine, progress=False)
    assert summary["changed"]["rejudge"] == len(touched) and summary["labelled"] == len(touched)
    assert summary["carried"] == len(before) - len(touched)
    # Exactly the touched pairs went to the judge: 2 orderings x 1 principle each, nothing else.
    assert len(engine.scored) == 2 * len(touched)
    texts = {r["comparison_id"]: (r["response_a"].strip(), r["response_b"].strip()) for r in before}
    for cid, (a, b) in texts.items():
        sent = sum(a in prompt and b in prompt for prompt in engine.scored)
        assert sent == (2 if cid in touched else 0), cid
    # Old labels stay; the untouched ones are carried over by reference, not recomputed.
    assert store.query("SELECT * FROM comparisons WHERE constitution_hash = ? ORDER BY comparison_id",
                       [old_hash]) == before
    carried = store.query("SELECT * FROM comparisons WHERE constitution_hash = ? AND carried_from IS NOT NULL",
                          [new.hash])
    by_id = {r["comparison_id"]: r for r in before}
    assert {r["carried_from"] for r in carried} == {r["comparison_id"] for r in before} - touched
    for r in carried:
        src = by_id[r["carried_from"]]
        assert (r["p_a"], r["principle_ids"], r["raw_output"]) == (src["p_a"], src["principle_ids"], src["raw_output"])
    rejudged = store.query("SELECT principle_ids FROM comparisons WHERE constitution_hash = ? "
                           "AND carried_from IS NULL", [new.hash])
    assert len(rejudged) == len(touched) and all(removed not in r["principle_ids"] for r in rejudged)
    # The preferences view reads the newest version's label of each pair, and says so.
    prefs = store.query("SELECT constitution_hash, versions_labelled, carried_from FROM preferences")
    assert prefs and {p["constitution_hash"] for p in prefs} == {new.hash}
    assert {p["versions_labelled"] for p in prefs} == {2}
    # A second run has nothing left to do; a plain full run under the new version would agree.
    again = run_label(store, cfg, engine=engine, progress=False)
    assert again["already_done"] == len(before) and len(engine.scored) == 2 * len(touched)

    rows = history(store, "harmless")
    assert [r["hash"] for r in rows] == [old_hash, new.hash]
    assert rows[1]["changed"] == [target] and rows[1]["removed"] == ([removed] if removed else [])
    assert rows[1]["comparisons"] == len(before) and rows[1]["comparisons_carried"] == len(carried)


def test_constitution_cli_history_diff_and_store_audit(labelled, tmp_path):
    import subprocess
    import sys

    cai = str(Path(sys.executable).parent / "cai")
    path = tmp_path / "cai.duckdb"
    shutil.copy(labelled["path"], path)
    new_file = edited(tmp_path, "v2", lambda d: d["principles"][0].update(weight=3.0))
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO), "HOME": str(Path.home())}

    def run(*args):
        return subprocess.run([cai, *args, "--db", str(path)], capture_output=True, text=True, env=env, timeout=120)

    out = run("constitution", "diff", str(new_file), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    first = load_constitution(HARMLESS).principles[0].id
    assert d["changed"] == {first: [{"field": "weight", "old": 1.0, "new": 3.0}]} and d["old_hash"][:6] in out.stdout
    h = load_constitution(HARMLESS).hash
    assert json.loads(run("constitution", "diff", h[:8], str(new_file), "--json").stdout)["new_hash"] != h
    bad = run("constitution", "diff", "ffff0000", str(new_file))
    assert bad.returncode == 1 and "neither a constitution file nor" in bad.stderr
    hist = run("constitution", "history", "harmless", "--json")
    assert json.loads(hist.stdout)[0]["comparisons"] == 8
    audit = run("constitution", "audit")
    assert audit.returncode == 0 and "share near 0.5" in audit.stdout, audit.stderr


def test_audit_against_people_flags_and_stores(labelled, tmp_path):
    from cai.audit import audit_against
    from cai.judge_spec import load_judge_spec

    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"x{i}", "prompt": f"How do I hurt {i} people?",
                                "chosen": "I can't help with hurting anyone.",
                                "rejected": f"First, find {i} weapons."}) + "\n")
    store = Store(tmp_path / "cai.duckdb")
    c = load_constitution(HARMLESS)
    spec = load_judge_spec(labelled["tmp"] / "judge.yaml")
    engine = CountingEngine(labelled["engine"])
    report = audit_against(store, c, pairs, spec, engine, model_id="tiny", limit=4, batch_size=4,
                           out_dir=tmp_path / "audit", progress=False)
    assert report.n_pairs == 4 and len(report.principles) == len(c.principles)
    # Every principle judged every pair in both orderings, in one batched call.
    assert len(engine.scored) == 4 * len(c.principles) * 2 and report.engine_calls == 1
    for a in report.principles:
        assert a.n == 4 and a.agreement.low <= a.agreement.estimate <= a.agreement.high
        assert (a.flag == "rewrite or drop") == (a.agreement.estimate <= 0.5)
    assert Path(report.plot).stat().st_size > 1000 and "Wilson" in Path(report.markdown_file).read_text()
    rows = store.query("SELECT metric, value, details FROM evaluations WHERE kind = 'constitution_audit' "
                       "AND subject_id = ?", [c.hash])
    assert {r["metric"] for r in rows} >= {f"agreement[{p.id}]" for p in c.principles}
    assert all("interval" in json.loads(r["details"]) for r in rows)


def test_relabel_changed_flow_publishes_artifacts(labelled, tmp_path, tiny_policy_dir):
    """The Prefect flow (ephemeral mode): diff artifact, label --changed, relabel summary artifact."""
    from prefect.client.orchestration import get_client

    from flows.versions import relabel_changed

    path = tmp_path / "cai.duckdb"
    shutil.copy(labelled["path"], path)
    target = load_constitution(HARMLESS).principles[0].id
    new_file = edited(tmp_path, "v2", lambda d: principle(d, target).update(judge="Which one is gentler?"))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "db": str(path), "constitution": str(new_file), "judge": str(labelled["tmp"] / "judge.yaml"),
        "policy": str(tiny_policy_dir), "engine": "transformers", "stages": ["label"],
        "label": {"pairs": ["two_samples"], "batch_size": 16}}))
    results = relabel_changed(run_file=str(run_file))
    label = results["label"]
    assert label["carried"] + label["changed"]["rejudge"] == 8 and label["labelled"] == label["changed"]["rejudge"]

    async def artifacts():
        async with get_client() as client:
            # Oldest first, so each key keeps its newest artifact (the Prefect database outlives a test).
            return {a.key: a.data for a in sorted(await client.read_artifacts(), key=lambda a: a.created)}

    import asyncio

    found = asyncio.run(artifacts())
    assert target in found["cai-constitution-diff"] and "judge" in found["cai-constitution-diff"]
    assert f"{label['carried']} labels carried over" in found["cai-relabel-changed"]


def test_critique_changed_redoes_only_rounds_from_the_changed_principle_on(labelled, tmp_path, tiny_policy_dir):
    from cai.critique import CritiqueConfig, run_critique

    path = tmp_path / "cai.duckdb"
    shutil.copy(labelled["path"], path)
    store = Store(path)
    cfg = CritiqueConfig(constitution=str(HARMLESS), model=str(tiny_policy_dir), rounds=2, few_shot=0, limit=6,
                         critique_max_tokens=3, revision_max_tokens=3, batch_size=8)
    engine = labelled["engine"]
    run_critique(store, cfg, engine=engine, progress=False)
    old = store.query("SELECT generation_id, round, principle_id FROM revisions ORDER BY generation_id, round")
    target = old[0]["principle_id"]
    new_file = edited(tmp_path, "v2", lambda d: principle(d, target).update(critique="Find every fault, briefly."))
    first_hit: dict[str, int] = {}
    for r in old:
        if r["principle_id"] == target:
            first_hit.setdefault(r["generation_id"], r["round"])
    redo = sum(cfg.rounds - rnd + 1 for rnd in first_hit.values())
    assert 0 < redo < len(old)

    class CountingChat(CountingEngine):
        def chat(self, conversations, params, **kw):
            self.scored += [json.dumps(c) for c in conversations]
            return self.inner.chat(conversations, params, **kw)

    counting = CountingChat(engine)
    summary = run_critique(store, cfg.model_copy(update={"constitution": str(new_file), "changed": True}),
                           engine=counting, progress=False)
    assert len(counting.scored) == 2 * redo  # one critique and one revision request per redone round
    assert summary["revised"] == redo and summary["carried"] == len(old) - redo
    assert summary["changed"]["reasons"] == {"changed": len(first_hit)}
    new_hash = load_constitution(new_file).hash
    rows = store.query("SELECT generation_id, round, carried_from, critique_request FROM revisions "
                       "WHERE constitution_hash = ?", [new_hash])
    assert len(rows) == len(old)
    for r in rows:
        touched = r["generation_id"] in first_hit and r["round"] >= first_hit[r["generation_id"]]
        assert (r["carried_from"] is None) == touched
