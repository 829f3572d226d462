"""Evaluation: `cai evaluate` (cai/evaluate.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from cai.cli.common import (
    DbOption,
    EngineOptionOption,
    SetOption,
    ShardOption,
    _fmt,
    _store,
    _train_config,
    app,
    console,
    engine_options,
    fail,
    print_rows,
)
from cai.store import StoreLockedError


@app.command("evaluate")
def evaluate(db: DbOption = None,
             policy: Annotated[str | None, typer.Option(help="Policy: store model id or folder (default: the newest "
                                                        "policy in the store).")] = None,
             baseline: Annotated[str | None, typer.Option(help="Compared with (default: the policy's parent).")] = None,
             judge: Annotated[str | None, typer.Option(help="Judge spec: path or name under judges/.")] = None,
             constitution: Annotated[str | None, typer.Option(help="Constitution: path or name.")] = None,
             reward_model: Annotated[str | None, typer.Option(help="Reward model (default: the one the policy was "
                                                              "trained against).")] = None,
             engine: Annotated[str | None, typer.Option(help="Generation engine: transformers | vllm | openai.")]
             = None,
             base_url: Annotated[str | None, typer.Option(help="Server URL for --engine openai.")] = None,
             judge_model: Annotated[str | None, typer.Option(help="Judge model (default: the spec's).")] = None,
             judge_engine: Annotated[str | None, typer.Option(help="transformers | vllm | openai (default: the "
                                                              "spec's).")] = None,
             split: Annotated[str | None, typer.Option(help="Prompts of this split (default: test).")] = None,
             limit: Annotated[int | None, typer.Option(help="At most this many prompts.")] = None,
             max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per response.")] = None,
             temperature: Annotated[float | None, typer.Option(help="0 = greedy (default).")] = None,
             seed: int | None = None,
             batch_size: Annotated[int | None, typer.Option(help="Prompts per engine call.")] = None,
             kl_samples: Annotated[int | None, typer.Option(help="Policy samples per prompt for KL (0: skip).")]
             = None,
             plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write PNG plots.")] = True,
             gold_rm: Annotated[str | None, typer.Option(help="Second-opinion reward model the RL stage did not use "
                                                         "(store id or folder): paired policy − baseline ± SE.")]
             = None,
             xstest: Annotated[str | None, typer.Option(help="XSTest prompts JSONL: refusal rates on its safe "
                                                        "(over-refusal) and unsafe prompts.")] = None,
             xstest_sample: Annotated[int | None, typer.Option(help="XSTest prompts per label (seeded).")] = None,
             refusal_classifier: Annotated[str | None, typer.Option(help="rules | phrases | judge | combined "
                                                                    "(default: the best measured).")] = None,
             engine_option: EngineOptionOption = None,
             shard: ShardOption = None,
             sets: SetOption = None) -> None:
    """Evaluate a policy against its parent on held-out prompts: judge win rate, reward, KL, length,
    refusals, Elo. Rows go to `evaluations`; a markdown report and PNG plots beside the DB."""
    from cai.evaluate import EvaluateConfig, run_evaluate
    from cai.models import ModelNotFoundError
    from cai.yamlio import SpecError

    cfg = _train_config(EvaluateConfig, {
        "policy": policy, "baseline": baseline, "judge": judge, "constitution": constitution,
        "reward_model": reward_model, "engine": engine, "engine_options": engine_options(base_url, engine_option) or None,
        "judge_model": judge_model, "judge_engine": judge_engine, "split": split, "limit": limit,
        "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "batch_size": batch_size,
        "kl_samples": kl_samples, "gold_rm": gold_rm, "xstest": xstest, "xstest_sample": xstest_sample,
        "refusal_classifier": refusal_classifier, "shard": shard}, sets)
    try:
        summary = run_evaluate(_store(db), cfg, plot=plot)
    except (SpecError, FileNotFoundError, ModelNotFoundError, LookupError, ValueError, StoreLockedError) as e:
        fail(str(e))
    baseline_values = summary.get("baseline", {})
    intervals = summary.get("intervals", {})

    def ci(value, low, high) -> str:
        return _fmt(value) if value is None or low is None or high is None else \
            f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"

    rows = [{"metric": name, "policy": ci(value, intervals.get(name, {}).get("ci_low"),
                                          intervals.get(name, {}).get("ci_high")),
             "baseline": ci(baseline_values.get(name), intervals.get(name, {}).get("baseline_ci_low"),
                            intervals.get(name, {}).get("baseline_ci_high")),
             "n": intervals.get(name, {}).get("n")}
            for name, value in summary["metrics"].items()]
    print_rows(rows, title=f"{summary['policy_id']} vs {summary['baseline_id']} (95 % intervals)", max_width=80)
    if summary.get("refusal_classifier"):
        console.print(f"refusal rates by {summary['refusal_classifier']['description']}", highlight=False,
                      soft_wrap=True)
    console.print(f"{summary['prompts']} prompts: {summary['wins']} wins, {summary['losses']} losses, "
                  f"{summary['ties']} ties, {summary['invalid']} invalid (judge: {summary['judge']})", highlight=False)
    if summary.get("elo"):
        print_rows([{"model": m, "elo": f"{r:.0f}"} for m, r in sorted(summary["elo"].items(), key=lambda kv: -kv[1])],
                   title="Elo (all evaluated models)", max_width=80)
    console.print(f"report: {summary['report']}", highlight=False, soft_wrap=True)
    for p in summary["plots"]:
        console.print(f"plot: {p}", highlight=False, soft_wrap=True)
    console.print(f"rows: cai sql \"select metric, value, baseline_value from policy_evaluations where run_id = "
                  f"'{summary['run_id']}'\"", highlight=False, soft_wrap=True, markup=False)
