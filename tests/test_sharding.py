"""`--shard I/N`: the union of N shards of generate, critique and label is, row for row, one
unsharded run (seeds come from item ids, not positions). Tiny model, real DuckDB."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cai.critique import CritiqueConfig, run_critique
from cai.generate import GenerateConfig, run_generate
from cai.label import LabelConfig, run_label
from cai.sharding import Shard, parse_shard, shard_of, split_shards, take_shard
from cai.store import Store

REPO = Path(__file__).resolve().parent.parent
VOLATILE = {"run_id", "created_at"}  # which run wrote a row, and when
TABLES = {"generations": "generation_id", "revisions": "revision_id", "comparisons": "comparison_id"}


def test_parse_and_partition():
    assert parse_shard("1/3") == Shard(1, 3) and parse_shard(None) is None and str(parse_shard(" 0 / 2 ")) == "0/2"
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ValueError, match="I < N|I/N"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="shard"):
        GenerateConfig(shard="2/2")
    keys = [f"item-{i}" for i in range(300)]
    parts = split_shards(keys, 3, str)
    assert sorted(sum(parts, [])) == sorted(keys) and all(60 < len(p) < 140 for p in parts)
    assert parts[1] == take_shard(keys, "1/3", str) and take_shard(keys, None, str) == keys
    # membership is a function of the key alone, not of position or of the other items
    assert take_shard(list(reversed(keys)), "1/3", str) == list(reversed(parts[1]))
    assert all(shard_of(k, 3) == 1 for k in parts[1])


def configs(tiny: Path, tmp: Path, constitution: Path) -> tuple[GenerateConfig, CritiqueConfig, LabelConfig]:
    text = (REPO / "judges" / "chain-of-thought.yaml").read_text()
    for old, new in {"model: smollm2-135m-instruct": f"model: {tiny}", "max_tokens: 192": "max_tokens: 3",
                     "min_option_prob: 0.01": "min_option_prob: 0"}.items():
        assert old in text, old
        text = text.replace(old, new)
    spec = tmp / "cot-tiny.yaml"
    spec.write_text(text)
    gen = GenerateConfig(model=str(tiny), n=2, max_tokens=4, temperature=1.0, limit=4, batch_size=3)
    crit = CritiqueConfig(model=str(tiny), constitution=str(constitution), rounds=2, few_shot=0, critique_max_tokens=3,
                          revision_max_tokens=3, temperature=1.0, batch_size=4)
    lab = LabelConfig(judge=str(spec), constitution=str(constitution), batch_size=3)
    return gen, crit, lab


def close(a, b) -> bool:
    """Equal, floats within 1e-3: log-probabilities move in the last bits with the padding shape of
    the batch a row was computed in (texts, ids, seeds and statuses are compared exactly)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-3
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    return a == b


def table(store: Store, name: str) -> dict[str, dict]:
    rows = store.query(f"SELECT * FROM {name}")
    for r in rows:  # JSON columns hold probabilities too: compare them parsed
        for k in ("raw_output",):
            if k in r:
                r[k] = json.loads(r[k])
    return {r[TABLES[name]]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def test_union_of_shards_is_one_unsharded_run(tmp_path, tiny_policy_dir, demo_prompt_files, constitution_path):
    from cai.ingest import ingest_file

    gen, crit, lab = configs(tiny_policy_dir, tmp_path, constitution_path)
    whole = Store(tmp_path / "whole.duckdb")
    ingest_file(whole, demo_prompt_files[0])
    shutil.copy(whole.path, tmp_path / "sharded.duckdb")
    sharded = Store(tmp_path / "sharded.duckdb")

    run_generate(whole, gen, progress=False)
    run_critique(whole, crit, progress=False)
    run_label(whole, lab, progress=False)

    n = 2
    for stage, run, cfg in (("generate", run_generate, gen), ("critique", run_critique, crit),
                            ("label", run_label, lab)):
        done = [run(sharded, cfg.model_copy(update={"shard": f"{i}/{n}"}), progress=False) for i in range(n)]
        assert all(d.get("shard") == f"{i}/{n}" for i, d in enumerate(done)), stage
    for name in TABLES:
        a, b = table(whole, name), table(sharded, name)
        assert a and a.keys() == b.keys(), name
        for key in a:
            assert close(a[key], b[key]), (name, key, a[key], b[key])
    # each shard did a real, non-empty share of the work
    runs = sharded.query("SELECT stage, count(*) AS n FROM runs WHERE status = 'ok' AND stage <> 'ingest' GROUP BY stage")
    assert {r["stage"]: r["n"] for r in runs} == {"generate": n, "critique": n, "label": n}
    # the cot judge really sampled: the reasoning differs between pairs
    assert len({json.dumps(r["raw_output"]) for r in table(whole, "comparisons").values()}) > 1


def test_resumed_shard_is_idempotent(tmp_path, tiny_policy_dir, demo_prompt_files, constitution_path):
    from cai.ingest import ingest_file

    gen, _, _ = configs(tiny_policy_dir, tmp_path, constitution_path)
    store = Store(tmp_path / "s.duckdb")
    ingest_file(store, demo_prompt_files[0])
    first = run_generate(store, gen.model_copy(update={"shard": "0/2"}), progress=False)
    again = run_generate(store, gen.model_copy(update={"shard": "0/2"}), progress=False)
    assert first["generated"] > 0 and again["generated"] == 0 and again["already_done"] == first["prompts"]
    other = run_generate(store, gen.model_copy(update={"shard": "1/2"}), progress=False)
    assert other["prompts"] + first["prompts"] == 4


def test_cli_shard_and_engine_option_errors(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app
    from cai.cli.common import engine_options

    assert engine_options("http://a", ["gpu_memory_utilization=0.8", "tensor_parallel_size=2", "quantization=awq"]) \
        == {"base_url": "http://a", "gpu_memory_utilization": 0.8, "tensor_parallel_size": 2, "quantization": "awq"}
    db = str(tmp_path / "x.duckdb")
    bad = CliRunner().invoke(app, ["generate", "--db", db, "--shard", "2/2"])
    assert bad.exit_code != 0 and "--shard" in bad.output and "0 <= I < N" in bad.output
    bad = CliRunner().invoke(app, ["label", "--db", db, "--engine-option", "no-equals-sign"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.output
    # evaluate and judge-eval take both options too (checked before any model loads)
    for cmd in (["evaluate", "--db", db], ["judge-eval", str(PAIRS_FILE), "--db", db]):
        bad = CliRunner().invoke(app, [*cmd, "--shard", "2/2"])
        assert bad.exit_code != 0 and "shard" in bad.output and "0 <= I < N" in bad.output, cmd
        bad = CliRunner().invoke(app, [*cmd, "--engine-option", "no-equals-sign"])
        assert bad.exit_code != 0 and "KEY=VALUE" in bad.output, cmd


def test_openai_engine_routes_by_prompt_prefix(monkeypatch):
    """Several base_urls: a request goes to the server its prompt's first tokens hash to, so prompts
    sharing a prefix share a server (and its prefix cache); different prefixes spread out."""
    import httpx
    from test_engines import _choice

    from cai.engines import SamplingParams

    hosts: dict[str, str] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        hosts[",".join(map(str, body["prompt"][0]))] = request.url.host
        return httpx.Response(200, json={"choices": [_choice(0, [111, 2])]})

    from test_engines import _FakeTokenizer

    from cai.engines.openai_engine import OpenAIEngine

    monkeypatch.setattr(OpenAIEngine, "_sleep", staticmethod(lambda attempt, retry_after: None))
    engine = OpenAIEngine("m", base_url="http://a/v1, http://b/v1,http://c/v1", tokenizer=_FakeTokenizer(),
                          served_model="m", progress=False)
    engine._client = httpx.Client(transport=httpx.MockTransport(handler))
    assert engine.base_urls == ["http://a/v1", "http://b/v1", "http://c/v1"] and engine.max_concurrency == 64
    long_prefix = "x" * 70  # 70 tokens with the fake tokenizer: past the 64 the route looks at
    prompts = [long_prefix + str(i) for i in range(6)] + [f"{i}-other" for i in range(30)]
    engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=2))
    by_prompt = {p: hosts[",".join(str(ord(c)) for c in p)] for p in prompts}
    assert len({by_prompt[p] for p in prompts[:6]}) == 1  # same prefix, same server
    assert set(by_prompt.values()) == {"a", "b", "c"}  # other prefixes use every server


# ---- judge-eval, rm score and evaluate take --shard too ------------------------------------------------
PAIRS_FILE = REPO / "tests" / "data" / "labelled_pairs.jsonl"


def test_judge_eval_shards_union_is_the_unsharded_items(tmp_path, tiny_policy_dir):
    from cai.engines import get_engine
    from cai.judge_eval import run_judge_eval
    from cai.judge_spec import load_judge_spec

    text = (REPO / "judges" / "multiple-choice.yaml").read_text()
    text = text.replace("model: smollm2-135m-instruct", f"model: {tiny_policy_dir}").replace(
        "min_option_prob: 0.01", "min_option_prob: 0")
    (tmp_path / "mc.yaml").write_text(text)
    spec = load_judge_spec(tmp_path / "mc.yaml")
    engine = get_engine("transformers", str(tiny_policy_dir), progress=False)
    store = Store(tmp_path / "je.duckdb")
    kw = dict(model_id="tiny", engine_kind="transformers", batch_size=4, out_dir=tmp_path / "out", progress=False)

    def items(report) -> dict[str, dict]:
        return {it["id"]: it for it in map(json.loads, Path(report.items_file).read_text().splitlines())}

    whole = items(run_judge_eval(store, PAIRS_FILE, spec, engine, **kw))
    reports = [run_judge_eval(store, PAIRS_FILE, spec, engine, shard=f"{i}/2", **kw) for i in range(2)]
    parts = [items(r) for r in reports]
    assert len(whole) == 6 and all(parts) and not parts[0].keys() & parts[1].keys()
    union = parts[0] | parts[1]
    assert union.keys() == whole.keys()
    for key, it in whole.items():  # same A/B coin, same verdict: position-free
        assert close({k: v for k, v in it.items() if k != "line"}, {k: v for k, v in union[key].items() if k != "line"})
    # each shard's metrics are rows of their own, marked with the shard; the unsharded rows are untouched
    assert [r.n for r in reports] == [len(p) for p in parts] and all(r.details["shard"] for r in reports)
    shards = store.query("SELECT DISTINCT details->>'shard' AS s FROM evaluations WHERE kind = 'judge_quality'")
    assert {r["s"] for r in shards} == {None, "0/2", "1/2"}


def test_rm_score_shards_union_is_the_unsharded_scores(tmp_path, tiny_reward_dir):
    from typer.testing import CliRunner

    from cai.cli import app
    from cai.rm import RewardModel, score_file, score_store

    rm = RewardModel.load(str(tiny_reward_dir))
    whole = score_file(rm, PAIRS_FILE, batch_size=4)
    parts = [score_file(rm, PAIRS_FILE, batch_size=4, shard=f"{i}/2") for i in range(2)]
    assert all(parts) and len(parts[0]) + len(parts[1]) == len(whole) == 6
    by_id = {r["id"]: r for r in parts[0] + parts[1]}
    for r in whole:
        assert close(r, by_id[r["id"]]) and "reward_chosen" in r

    store = Store(tmp_path / "rm.duckdb")
    store.init()
    sql = ("SELECT * FROM (VALUES ('a', 'hi', 'hello'), ('b', 'hi', 'bye'), ('c', 'why?', 'because'), "
           "('d', 'who?', 'me'), ('e', 'what?', 'this')) t(id, prompt, response)")
    rows = score_store(rm, store, sql=sql, batch_size=2)
    split = [score_store(rm, store, sql=sql, batch_size=2, shard=f"{i}/2") for i in range(2)]
    assert sorted(r["id"] for r in split[0] + split[1]) == sorted(r["id"] for r in rows)
    assert close(sorted(rows, key=lambda r: r["id"]), sorted(split[0] + split[1], key=lambda r: r["id"]))
    # the command line takes it, and says how to write a bad one
    out = tmp_path / "s0.jsonl"
    ok = CliRunner().invoke(app, ["rm", "score", str(PAIRS_FILE), "--model", str(tiny_reward_dir), "--db",
                                  str(store.path), "--shard", "0/2", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [r["id"] for r in parts[0]]
    bad = CliRunner().invoke(app, ["rm", "score", str(PAIRS_FILE), "--model", str(tiny_reward_dir), "--shard", "2"])
    assert bad.exit_code != 0 and "I/N" in bad.output


def test_evaluate_shards_union_is_the_unsharded_rows(tmp_path, tiny_policy_dir, demo_prompt_files, constitution_path):
    """Generations and judged comparisons of two evaluate shards are, row for row, one unsharded run's."""
    from cai.evaluate import EvaluateConfig, run_evaluate
    from cai.ingest import ingest_file
    from cai.testing import build_tiny_model

    text = (REPO / "judges" / "multiple-choice.yaml").read_text()
    text = text.replace("model: smollm2-135m-instruct", f"model: {tiny_policy_dir}").replace(
        "min_option_prob: 0.01", "min_option_prob: 0")
    (tmp_path / "mc.yaml").write_text(text)
    policy = build_tiny_model(tmp_path / "other-policy", "policy", seed=3)
    whole = Store(tmp_path / "whole.duckdb")
    ingest_file(whole, demo_prompt_files[0])
    shutil.copy(whole.path, tmp_path / "sharded.duckdb")
    sharded = Store(tmp_path / "sharded.duckdb")
    cfg = EvaluateConfig(policy=str(policy), baseline=str(tiny_policy_dir), judge=str(tmp_path / "mc.yaml"),
                         constitution=str(constitution_path), limit=4, max_tokens=3, temperature=1.0, kl_samples=0,
                         batch_size=4, report_dir=str(tmp_path / "reports"))
    s = run_evaluate(whole, cfg, progress=False, plot=False)
    done = [run_evaluate(sharded, cfg.model_copy(update={"shard": f"{i}/2"}), progress=False, plot=False)
            for i in range(2)]
    assert [d["shard"] for d in done] == ["0/2", "1/2"] and all(d["prompts"] for d in done)
    assert sum(d["prompts"] for d in done) == s["prompts"] == 4
    for name in ("generations", "comparisons"):
        a, b = table(whole, name), table(sharded, name)
        assert a and a.keys() == b.keys(), name
        for key in a:
            for row in (a[key], b[key]):  # which evaluate run judged the pair is volatile, like run_id
                if row.get("params"):
                    row["params"] = {k: v for k, v in json.loads(row["params"]).items() if k != "evaluate_run_id"}
            assert close(a[key], b[key]), (name, key)
    # each shard's metrics are their own evaluation rows (the evaluation key names the shard)
    assert sharded.scalar("SELECT count(DISTINCT details->>'eval_key') FROM evaluations WHERE metric = 'win_rate'") == 2
