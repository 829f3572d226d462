"""People's labels as yardsticks (issue 12): train-rm's choice of label sources, and judge-eval /
rm eval reporting accuracy with its interval beside the longer-answer baseline, per subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_reward import fill, human_pairs_file

from cai.pair_accuracy import accuracy_report, longer_pick
from cai.preferences import import_preferences
from cai.reward import RewardConfig, load_pairs, parse_sources, train_reward
from cai.store import Store

TINY_TRAIN = dict(lr=1e-3, max_steps=2, batch_size=4, val_fraction=0.25)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory) -> Store:
    """AI-judge comparisons (planted) and two sets of people's labels imported from files."""
    tmp = tmp_path_factory.mktemp("mixed")
    store = Store(tmp / "cai.duckdb")
    fill(store, n_prompts=8, pairs_per_prompt=2, seed=0)  # 16 AI comparisons, split train
    import_preferences(store, [human_pairs_file(tmp / "gold.jsonl", n=24, seed=3)])
    import_preferences(store, [human_pairs_file(tmp / "other.jsonl", n=6, seed=4)])
    return store


def test_parse_and_validate_sources():
    assert parse_sources("human") == {"human": 1.0}
    assert parse_sources("ai=1, human:gold=0.5") == {"ai": 1.0, "human:gold": 0.5}
    assert RewardConfig(sources="human:gold").sources == {"human:gold": 1.0}
    for bad, msg in (("robots", "unknown source"), ("ai=0", "must be > 0"), ("ai=x", "must be a number"),
                     ("", "at least one")):
        with pytest.raises(ValueError, match=msg):
            RewardConfig(sources=bad)
    # The default selection keeps the model ids of before; any other changes them.
    assert "sources" not in RewardConfig().identity()
    assert RewardConfig(sources="human").identity()["sources"] == {"human": 1.0}


def test_sources_select_and_weight_the_data(mixed_store: Store):
    human_train = mixed_store.scalar("SELECT count(*) FROM human_preferences WHERE split = 'train'")
    gold_train = mixed_store.scalar("SELECT count(*) FROM human_preferences WHERE split = 'train' AND source = 'gold'")
    assert 0 < gold_train < human_train < 30  # the import held some prompts out as 'test'

    ai, snap = load_pairs(mixed_store, RewardConfig())  # today's behaviour: the AI judge's labels only
    assert len(ai) == 16 and snap["sources"] == {"ai": {"weight": 1.0, "comparisons": 16}}
    assert snap["human_sources"] == {} and all(p.weight == 1.0 for p in ai)

    people, snap = load_pairs(mixed_store, RewardConfig(sources="human"))
    assert len(people) == human_train and snap["judge_names"] == ["human:gold", "human:other"]
    assert snap["human_sources"]["human:gold"] == gold_train

    gold, snap = load_pairs(mixed_store, RewardConfig(sources="human:gold", split=None))
    assert len(gold) == 24 and snap["judge_names"] == ["human:gold"]

    # A weighted mix: people's pairs count three times an AI pair, weights rescaled to mean 1.
    mix, snap = load_pairs(mixed_store, RewardConfig(sources="ai=1,human:gold=3"))
    assert len(mix) == 16 + gold_train
    w = {round(p.weight, 6) for p in mix}
    assert len(w) == 2 and max(w) == pytest.approx(3 * min(w))
    assert sum(p.weight for p in mix) / len(mix) == pytest.approx(1.0)
    assert snap["sources"]["human:gold"] == {"weight": 3.0, "comparisons": gold_train}
    # The AI-label filters leave people's labels alone.
    only_judge, _ = load_pairs(mixed_store, RewardConfig(sources="ai,human", judge_spec_hash="judge-synthetic"))
    assert len(only_judge) == 16 + human_train


def test_gold_rm_on_people_alone_records_its_data(mixed_store: Store, tiny_reward_dir, tmp_path):
    """The same trainer makes a 'gold' model from people's labels; the id follows the selection."""
    gold = train_reward(mixed_store, RewardConfig(base_model=str(tiny_reward_dir), sources="human:gold",
                                                  output_dir=str(tmp_path / "gold"), **TINY_TRAIN), progress=False)
    mix = train_reward(mixed_store, RewardConfig(base_model=str(tiny_reward_dir), sources="ai=1,human:gold=2",
                                                 output_dir=str(tmp_path / "mix"), **TINY_TRAIN), progress=False)
    assert gold["finished"] and mix["finished"] and gold["model_id"] != mix["model_id"]
    snap = json.loads(mixed_store.scalar("SELECT data_snapshot FROM models WHERE model_id = ?", [gold["model_id"]]))
    assert snap["judge_names"] == ["human:gold"] and snap["filters"]["sources"] == {"human:gold": 1.0}
    assert snap["sources"]["human:gold"]["comparisons"] == snap["comparisons"] == gold["pairs"]
    snap = json.loads(mixed_store.scalar("SELECT data_snapshot FROM models WHERE model_id = ?", [mix["model_id"]]))
    assert set(snap["sources"]) == {"ai", "human:gold"} and snap["sources"]["ai"]["comparisons"] == 16


def test_accuracy_report_by_hand():
    # Scores 1, 1, 0.5, 0 -> 2.5 / 4; the longer answer wins on pairs 1 and 3 -> 0.5.
    r = accuracy_report([1, 1, 0.5, 0], ["long answer", "a", "bb", "longer one"], ["x", "bbb", "cc", "y"],
                        [{"subset": "s1"}, {"subset": "s1"}, {"subset": "s2"}, {"subset": "s2"}])
    assert r.accuracy.estimate == 0.625 and r.accuracy.n == 4 and r.accuracy.method == "wilson"
    assert r.length_baseline.estimate == 0.625  # 1, 0, 0.5 (equal length), 1
    assert [longer_pick(c, x) for c, x in (("ab", "a"), ("a", "ab"), ("a", "b"))] == [1.0, 0.0, 0.5]
    assert r.vs_length.estimate == pytest.approx(0.0) and r.vs_length.stderr is not None
    assert [(g.value, g.accuracy.estimate, g.length_baseline.estimate) for g in r.groups] == [
        ("s1", 1.0, 0.5), ("s2", 0.25, 0.75)]
    text = "\n".join(r.lines())
    assert "accuracy (95% Wilson): 0.625 [" in text and "longer-answer baseline" in text and "subset=s2" in text


def test_rm_eval_prints_interval_length_baseline_and_subsets(mixed_store: Store, tiny_reward_dir, tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in human_pairs_file(tmp_path / "h.jsonl", n=8, seed=9).read_text().splitlines()]
    for i, r in enumerate(rows):
        r["subset"] = "even" if i % 2 == 0 else "odd"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["rm", "eval", str(pairs), "--model", str(tiny_reward_dir),
                                      "--db", str(mixed_store.path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    low, high = summary["accuracy_95ci"]
    assert low <= summary["accuracy"] <= high and summary["pairs"] == 8
    assert [g["value"] for g in summary["by_subset"]] == ["even", "odd"]
    assert "accuracy (95% Wilson):" in result.stderr and "longer-answer baseline, same pairs:" in result.stderr
    assert "subset=odd" in result.stderr
    stored = {r["metric"]: r for r in mixed_store.query("SELECT * FROM reward_model_quality")}
    assert {"accuracy", "length_baseline", "accuracy_minus_length_baseline", "accuracy[subset=even]",
            "length_baseline[subset=odd]"} <= set(stored)
    assert stored["accuracy"]["low"] == pytest.approx(low, abs=1e-4) and stored["accuracy"]["interval_n"] == 8


def test_judge_eval_prints_interval_length_baseline_subsets_and_principles(tiny_policy_dir, tmp_path: Path,
                                                                           constitution_path):
    from test_label import PAIRS_FILE, judge_file
    from typer.testing import CliRunner

    from cai.cli import app

    rows = [json.loads(line) for line in PAIRS_FILE.read_text().splitlines()][:4]
    for i, r in enumerate(rows):
        r["agreement"] = "3/3" if i < 2 else "2/3"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = judge_file(tmp_path, tiny_policy_dir, **{"min_option_prob: 0.01": "min_option_prob: 0"})
    db = tmp_path / "cai.duckdb"
    result = CliRunner().invoke(app, ["judge-eval", str(pairs), "--spec", str(spec), "--constitution",
                                      str(constitution_path), "--out-dir", str(tmp_path / "ev"), "--db", str(db)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for expected in ("95% interval", "length_baseline", "agreement_minus_length_baseline", "per subset",
                     "agreement", "3/3", "2/3", "per principle (95% Wilson intervals)"):
        assert expected in out, expected
    stored = {r["metric"]: r for r in Store(db).query("SELECT * FROM judge_quality")}
    assert stored["agreement"]["low"] <= stored["agreement"]["value"] <= stored["agreement"]["high"]
    # The longer answer is the people's choice in 3 of these 4 pairs.
    assert stored["length_baseline"]["value"] == pytest.approx(
        sum(longer_pick(r["chosen"], r["rejected"]) for r in rows) / 4)
    assert "agreement[agreement=3/3]" in stored and "length_baseline[agreement=2/3]" in stored
    assert any(m.startswith("agreement[") and "=" not in m and stored[m]["low"] is not None for m in stored)
