"""`cai label`, the preferences view, `cai export --format trl` and `cai judge-eval`, on a real
DuckDB file with generations sampled by the tiny model and judged by it through transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.label import LabelConfig, run_label, select_pairs
from cai.store import Store, content_hash, now

REPO = Path(__file__).resolve().parent.parent
CAI = str(Path(sys.executable).parent / "cai")
PAIRS_FILE = REPO / "tests" / "data" / "labelled_pairs.jsonl"


def judge_file(tmp_path: Path, tiny_dir: Path, name: str = "multiple-choice", **replace: str) -> Path:
    """A shipped judge spec pointed at the tiny model. The random tiny model puts ~2e-5 on each
    option, so `min_option_prob: 0` turns the improbable-token check off where a test wants labels."""
    text = (REPO / "judges" / f"{name}.yaml").read_text()
    text = text.replace("model: smollm2-135m-instruct", f"model: {tiny_dir}")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    out = tmp_path / f"{name}-tiny.yaml"
    out.write_text(text)
    return out


@pytest.fixture(scope="module")
def filled_template(tmp_path_factory, tiny_policy_dir, demo_prompt_files):
    """A store with prompts, two samples each from the tiny model, and critique revisions for some
    of them; built once per module, copied for each test."""
    from cai.generate import GenerateConfig, run_generate
    from cai.ingest import ingest_file

    store = Store(tmp_path_factory.mktemp("label") / "template.duckdb")
    ingest_file(store, demo_prompt_files[1])
    run_generate(store, GenerateConfig(model=str(tiny_policy_dir), n=2, max_tokens=6, limit=4, batch_size=8),
                 progress=False)
    gens = store.query("SELECT generation_id, text FROM generations WHERE sample_index = 0 ORDER BY generation_id")
    rows = []

    def rev(gen, round_, text, status="ok"):
        rows.append({"revision_id": content_hash("rev", gen["generation_id"], round_),
                     "generation_id": gen["generation_id"], "round": round_, "principle_id": "p",
                     "constitution_hash": "c0", "revision": text, "status": status, "model_id": "m",
                     "params_hash": "h", "created_at": now()})

    rev(gens[0], 1, "A first revision.")
    rev(gens[0], 2, "The final, better revision.")  # final ok round: this one is paired
    rev(gens[1], 1, "Only good revision.")
    rev(gens[1], 2, "ignored", status="unchanged")  # not ok: round 1 stays the final revision
    rev(gens[2], 1, gens[2]["text"])  # identical to the initial text: skipped, nothing to prefer
    store.insert("revisions", rows)
    return {"path": store.path, "gens": gens}


@pytest.fixture
def filled(filled_template, tmp_path):
    import shutil

    path = tmp_path / "cai.duckdb"
    shutil.copy(filled_template["path"], path)
    return {"store": Store(path), "gens": filled_template["gens"]}


def test_pairs_from_revisions_and_from_two_samples(filled):
    store, gens = filled["store"], filled["gens"]
    pairs = select_pairs(store, ["initial_vs_revised", "two_samples"])
    revised = [p for p in pairs if p["pair_kind"] == "initial_vs_revised"]
    samples = [p for p in pairs if p["pair_kind"] == "two_samples"]
    assert len(samples) == 4 and len(revised) == 3
    by_gen = {p["a_id"]: p for p in revised}
    assert by_gen[gens[0]["generation_id"]]["b_text"] == "The final, better revision."
    assert by_gen[gens[1]["generation_id"]]["b_text"] == "Only good revision."
    sample_index = {r["generation_id"]: r["sample_index"] for r in
                    store.query("SELECT generation_id, sample_index FROM generations")}
    assert all(sample_index[p["a_id"]] == 0 and sample_index[p["b_id"]] == 1 for p in samples)


def test_label_fills_comparisons_resumes_and_is_idempotent(filled, tiny_policy_dir, tmp_path, constitution_path):
    store = filled["store"]
    spec = judge_file(tmp_path, tiny_policy_dir, **{"min_option_prob: 0.01": "min_option_prob: 0"})
    cfg = LabelConfig(judge=str(spec), constitution=str(constitution_path), batch_size=2)
    first = run_label(store, cfg.model_copy(update={"limit": 3}), progress=False)
    assert first["labelled"] == 3 and first["identical_skipped"] == 1
    full = run_label(store, cfg, progress=False)
    assert full["already_done"] == 3 and full["labelled"] == 3 and full["pairs"] == 6
    again = run_label(store, cfg, progress=False)
    assert again["labelled"] == 0 and again["already_done"] == 6
    assert store.scalar("SELECT count(*) FROM comparisons") == 6

    rows = store.query("SELECT * FROM comparisons ORDER BY comparison_id")
    from cai.constitution import load_constitution
    from cai.judge_spec import load_judge_spec

    c, s = load_constitution(constitution_path), load_judge_spec(spec)
    ids = {p.id for p in c.principles}
    for r in rows:
        assert r["status"] == "ok" and r["reason"] is None
        assert r["judge_spec_hash"] == s.hash and r["constitution_hash"] == c.hash
        assert r["method"] == "multiple_choice" and r["judge_engine"] == "transformers"
        assert len(r["principle_ids"]) == 1 and r["principle_ids"][0] in ids
        assert 0 < r["p_a"] < 1 and r["p_a"] == pytest.approx((r["p_a_first"] + r["p_a_swapped"]) / 2)
        assert r["position_consistent"] == ((r["p_a_first"] > 0.5) == (r["p_a_swapped"] > 0.5))
        raw = json.loads(r["raw_output"])
        assert raw["principles"][0]["id"] == r["principle_ids"][0]
        assert set(raw["principles"][0]["option_probs"]) == {"first", "swapped"}
    assert {r["pair_kind"] for r in rows} == {"initial_vs_revised", "two_samples"}
    assert store.scalar("SELECT count(*) FROM constitutions WHERE constitution_hash = ?", [c.hash]) == 1
    runs = store.query("SELECT status, summary FROM runs WHERE stage = 'label' ORDER BY started_at")
    assert [r["status"] for r in runs] == ["ok", "ok"]  # the no-op re-run starts no run
    # A different seed is a different labelling (new principle draws): new rows, old ones kept.
    other = run_label(store, cfg.model_copy(update={"seed": 1}), progress=False)
    assert other["labelled"] == 6 and store.scalar("SELECT count(*) FROM comparisons") == 12


def test_invalid_judgements_are_stored_and_kept_out_of_preferences(filled, tiny_policy_dir, tmp_path,
                                                                   constitution_path):
    store = filled["store"]
    spec = judge_file(tmp_path, tiny_policy_dir)  # shipped threshold: the random model's options are improbable
    s = run_label(store, LabelConfig(judge=str(spec), constitution=str(constitution_path), pairs=["two_samples"]),
                  progress=False)
    assert s["labelled"] == 4 and s["invalid"] == 4
    rows = store.query("SELECT status, reason, p_a, raw_output FROM comparisons")
    assert {(r["status"], r["reason"], r["p_a"]) for r in rows} == {("invalid", "both_tokens_improbable", None)}
    assert all(sum(json.loads(r["raw_output"])["principles"][0]["option_probs"]["first"]) < 0.01 for r in rows)
    assert store.scalar("SELECT count(*) FROM preferences") == 0
    # Invalid rows are not retried on a re-run (same ids): the stage is idempotent.
    assert run_label(store, LabelConfig(judge=str(spec), constitution=str(constitution_path),
                                        pairs=["two_samples"]), progress=False)["labelled"] == 0


def test_cot_label_stores_reasoning_and_clamps(filled, tiny_policy_dir, tmp_path, constitution_path):
    store = filled["store"]
    spec = judge_file(tmp_path, tiny_policy_dir, "chain-of-thought",
                      **{"min_option_prob: 0.01": "min_option_prob: 0", "max_tokens: 192": "max_tokens: 4",
                         "clamp: [0.4, 0.6]": "clamp: [0.499, 0.501]"})
    run_label(store, LabelConfig(judge=str(spec), constitution=str(constitution_path), pairs=["two_samples"]),
              progress=False)
    rows = store.query("SELECT p_a, p_a_first, p_a_swapped, raw_output, method FROM comparisons")
    assert len(rows) == 4 and {r["method"] for r in rows} == {"cot"}
    clamped = 0
    for r in rows:
        raw = json.loads(r["raw_output"])
        reasoning = raw["principles"][0]["reasoning"]
        assert set(reasoning) == {"first", "swapped"} and all(isinstance(t, str) for t in reasoning.values())
        # The label is the judge's own two-ordering average, clamped to the spec's bounds: recompute it
        # from the stored per-ordering probabilities (not from the bounds alone).
        unclamped = (r["p_a_first"] + r["p_a_swapped"]) / 2
        assert raw["principles"][0]["p"] == pytest.approx(unclamped)
        assert r["p_a"] == pytest.approx(min(max(unclamped, 0.499), 0.501))
        outside = not 0.499 <= unclamped <= 0.501
        assert ("unclamped_p_a" in raw) == outside
        if outside:
            assert raw["unclamped_p_a"] == pytest.approx(unclamped)
        clamped += outside
    assert clamped >= 1  # the clamp really acted on at least one label (the tiny judge is far from 0.5)


def test_preferences_view_tie_rule_and_trl_export(filled, tiny_policy_dir, tmp_path, constitution_path):
    import datasets
    from trl.data_utils import apply_chat_template, is_conversational

    from cai.export import export_trl

    store = filled["store"]
    spec = judge_file(tmp_path, tiny_policy_dir, **{"min_option_prob: 0.01": "min_option_prob: 0"})
    run_label(store, LabelConfig(judge=str(spec), constitution=str(constitution_path)), progress=False)
    comps = {r["comparison_id"]: r for r in store.query("SELECT * FROM comparisons")}
    # A tie: p_a = 0.5 exactly states no preference and must not become a training pair.
    tie = dict(next(iter(comps.values())), comparison_id="tie", p_a=0.5, raw_output="{}")
    store.insert("comparisons", [tie])
    prefs = store.query("SELECT * FROM preferences")
    assert len(prefs) == len(comps) and "tie" not in {p["comparison_id"] for p in prefs}
    for p in prefs:
        c = comps[p["comparison_id"]]
        a_wins = c["p_a"] > 0.5
        assert p["chosen"] == (c["response_a"] if a_wins else c["response_b"])
        assert p["rejected"] == (c["response_b"] if a_wins else c["response_a"])
        assert p["chosen_id"] == (c["response_a_id"] if a_wins else c["response_b_id"])
        assert p["probability"] == pytest.approx(max(c["p_a"], 1 - c["p_a"])) and p["probability"] > 0.5

    out = tmp_path / "prefs.jsonl"
    assert export_trl(store, out) == len(prefs)
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names) and len(ds) == len(prefs)
    ex = ds[0]
    assert is_conversational(ex) and ex["chosen"][0]["role"] == "assistant"
    from transformers import AutoTokenizer

    text = apply_chat_template({k: ex[k] for k in ("prompt", "chosen", "rejected")},
                               AutoTokenizer.from_pretrained(tiny_policy_dir))
    assert text["prompt"].endswith("<|im_start|>assistant\n") and text["chosen"].endswith("<|im_end|>\n")

    pq = tmp_path / "prefs.parquet"
    assert export_trl(store, pq, style="standard", minimal=True) == len(prefs)
    ds = datasets.load_dataset("parquet", data_files=str(pq), split="train")
    assert ds.column_names == ["prompt", "chosen", "rejected"] and isinstance(ds[0]["prompt"], str)
    assert export_trl(store, tmp_path / "none.jsonl", min_probability=1.0) == 0


def test_judge_eval_report_evaluations_and_plot(store, tiny_policy_dir, tmp_path, constitution_path):
    from cai.constitution import load_constitution
    from cai.engines import get_engine
    from cai.judge_eval import run_judge_eval
    from cai.judge_spec import load_judge_spec
    from cai.label import principle_refs

    spec = load_judge_spec(judge_file(tmp_path, tiny_policy_dir, **{"min_option_prob: 0.01": "min_option_prob: 0",
                                                                     "mode: sample": "mode: all", "  k: 1\n": ""}))
    c = load_constitution(constitution_path)
    engine = get_engine("transformers", str(tiny_policy_dir), progress=False)
    kwargs = dict(model_id="tiny", engine_kind="transformers", principles=principle_refs(c)[:3],
                  constitution_hash=c.hash, batch_size=4, out_dir=tmp_path / "eval", progress=False)
    report = run_judge_eval(store, PAIRS_FILE, spec, engine, **kwargs)
    m = report.metrics
    assert report.n == 6 and m["n_valid"] == 6 and m["invalid_rate"] == 0
    for key in ("agreement", "agreement_first_ordering", "agreement_swapped_ordering", "position_consistency",
                "first_position_rate", "brier", "ece", "brier_first_ordering", "ece_first_ordering"):
        assert m[key] is not None and 0 <= m[key] <= 1, key
    items = [json.loads(line) for line in Path(report.items_file).read_text().splitlines()]
    assert {it["y"] for it in items} <= {0, 1} and len(items) == 6
    assert m["agreement"] == pytest.approx(
        sum((it["p_a"] > 0.5) == (it["y"] == 1) for it in items) / 6)
    assert [p["principle"] for p in report.per_principle] == sorted(p.id for p in c.principles[:3])
    assert all(p["n"] == 6 for p in report.per_principle)
    assert Path(report.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = store.query("SELECT metric, value, judge_spec_hash FROM judge_quality")
    metrics = {r["metric"]: r["value"] for r in rows}
    assert metrics["agreement"] == pytest.approx(m["agreement"])
    assert f"agreement[{c.principles[0].id}]" in metrics
    assert {r["judge_spec_hash"] for r in rows} == {spec.hash}
    again = run_judge_eval(store, PAIRS_FILE, spec, engine, **kwargs)
    assert again.evaluation_rows == 0 and store.scalar("SELECT count(*) FROM judge_quality") == len(rows)


def test_judge_eval_rejects_bad_lines(tmp_path):
    from cai.judge_eval import load_labelled_pairs
    from cai.yamlio import SpecError

    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": ""}\n{"prompt": 3, "chosen": "a", "rejected": "b"}\n'
                 '{"prompt": "q", "chosen": null, "rejected": "b"}\nnot json\n')
    with pytest.raises(SpecError) as e:
        load_labelled_pairs(f)
    text = str(e.value)
    assert f"{f}:2: prompt:" in text and f"{f}:3: chosen: must be text" in text and f"{f}:4: " in text
    assert f"{f}:1" not in text  # an empty response is a real (bad) answer
    assert load_labelled_pairs(f, limit=1)[0].rejected == ""


def test_cli_label_export_and_judge_eval(filled, tiny_policy_dir, tmp_path, constitution_path):
    db = filled["store"].path
    env = {**os.environ, "CAI_DB": str(db)}
    spec = judge_file(tmp_path, tiny_policy_dir, **{"min_option_prob: 0.01": "min_option_prob: 0"})

    def cai(*args):
        out = subprocess.run([CAI, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO)
        assert out.returncode == 0, out.stderr + out.stdout
        return out.stdout

    out = cai("label", "--judge", spec, "--constitution", "harmless", "--pairs", "two_samples", "--batch-size", "3")
    assert json.loads(out)["labelled"] == 4
    cai("export", "--format", "trl", "--out", tmp_path / "p.jsonl")
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == Store(db).scalar("SELECT count(*) FROM preferences") > 0
    assert set(json.loads(lines[0])) == {"prompt", "chosen", "rejected", "id", "probability"}
    report = cai("judge-eval", PAIRS_FILE, "--spec", spec, "--limit", "4", "--out-dir", tmp_path / "ev")
    assert "agreement_first_ordering" in report and "position_consistency" in report and "brier" in report
    assert "4 pairs" in report and list((tmp_path / "ev").glob("*.png"))
    assert Store(db).scalar("SELECT count(*) FROM judge_quality WHERE metric = 'agreement'") == 1
    bad = subprocess.run([CAI, "label", "--judge", "nope"], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 1 and "no judge spec 'nope'" in bad.stderr


def test_contrast_pairs_by_construction_and_rescored(tiny_policy_dir, tmp_path, constitution_path, demo_prompt_files):
    """RLCD: two answers per prompt under the follow / violate system prompts with the same seed,
    labelled by construction; a re-run adds nothing; rescore labels with the judge."""
    from cai.contrast import ContrastConfig
    from cai.ingest import ingest_file

    store = Store(tmp_path / "c.duckdb")
    ingest_file(store, demo_prompt_files[0])
    contrast = ContrastConfig(model=str(tiny_policy_dir), max_tokens=6, limit=5, confidence=0.8)
    cfg = LabelConfig(judge=str(judge_file(tmp_path, tiny_policy_dir, **{"min_option_prob: 0.01": "min_option_prob: 0"})),
                      constitution=str(constitution_path), pairs=["contrast"], contrast=contrast, batch_size=4)
    s = run_label(store, cfg, progress=False)
    assert s["contrast_prompts"] == 5 and s["contrast_labelled"] + s["contrast_identical_skipped"] == 5
    rows = store.query("""SELECT c.*, gf.params AS pf, gv.params AS pv, gf.seed AS sf, gv.seed AS sv,
                                 gf.stage AS stf, gv.stage AS stv
                          FROM comparisons c JOIN generations gf ON gf.generation_id = c.response_a_id
                          JOIN generations gv ON gv.generation_id = c.response_b_id""")
    assert len(rows) == s["contrast_labelled"] > 0
    for r in rows:
        raw, pf, pv = json.loads(r["raw_output"]), json.loads(r["pf"]), json.loads(r["pv"])
        assert r["pair_kind"] == "contrast" and r["p_a"] == 0.8 and r["status"] == "ok"
        assert r["principle_ids"] == [raw["principle"]] == [pf["principle_id"]]
        assert pf["system"] == raw["system_follow"] and pv["system"] == raw["system_violate"]
        assert raw["system_follow"] != raw["system_violate"]
        assert (r["stf"], r["stv"]) == ("contrast_follow", "contrast_violate") and r["sf"] == r["sv"]
        assert json.loads(r["params"])["contrast"]["confidence"] == 0.8
    # The pairs reach the preferences view with the follow answer chosen.
    prefs = store.query("SELECT * FROM preferences WHERE pair_kind = 'contrast'")
    assert len(prefs) == len(rows) and {p["chosen"] for p in prefs} == {r["response_a"] for r in rows}
    assert run_label(store, cfg, progress=False)["contrast_labelled"] == 0  # idempotent
    # In bulk: a second draw per prompt keeps the first draw's rows and adds one pair per prompt with
    # its own seed (the draw is in the generation's sample_index).
    two = cfg.model_copy(update={"contrast": contrast.model_copy(update={"pairs_per_prompt": 2})})
    more = run_label(store, two, progress=False)
    # (pairs whose two answers came out identical are not stored, so they count as to do again)
    assert more["contrast_already_done"] == s["contrast_labelled"]
    assert more["contrast_labelled"] + more["contrast_identical_skipped"] == 5 + s["contrast_identical_skipped"]
    draws = store.query("SELECT prompt_id, sample_index, seed FROM generations WHERE stage = 'contrast_follow'")
    assert sorted(r["sample_index"] for r in draws) == [0] * 5 + [1] * 5
    by_prompt = {(r["prompt_id"], r["sample_index"]): r["seed"] for r in draws}
    assert all(by_prompt[(p, 0)] != by_prompt[(p, 1)] for p, _ in by_prompt)
    assert run_label(store, two, progress=False)["contrast_labelled"] == 0
    # RLCD-rescore: same answers (same ids), labelled by the judge.
    rescored = run_label(store, cfg.model_copy(update={"contrast": contrast.model_copy(update={"rescore": True})}),
                         progress=False)
    assert rescored["contrast_labelled"] == len(rows)
    new = store.query("SELECT * FROM comparisons WHERE method LIKE 'rlcd_rescore:%'")
    assert {(r["response_a_id"], r["response_b_id"]) for r in new} == {(r["response_a_id"], r["response_b_id"]) for r in rows}
    assert all(0 < r["p_a"] < 1 and r["p_a"] != 0.8 and r["judge_name"] == "multiple-choice" for r in new)
    assert store.query("SELECT count(*) AS n FROM generations")[0]["n"] == 2 * 2 * s["contrast_prompts"]
