"""Judging: judge specs (`cai judge lint/schema/show`), `cai label`, `cai judge-eval`, `cai export` (issue 4)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cai.cli.common import (
    DbOption,
    EngineOptionOption,
    ShardOption,
    _fmt,
    _store,
    app,
    console,
    engine_options,
    err,
    fail,
    print_rows,
)
from cai.store import StoreLockedError

judge_app = typer.Typer(help="Judge spec files (judges/*.yaml): lint, show, JSON Schema.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")


@judge_app.command("lint")
def judge_lint(files: Annotated[list[Path], typer.Argument(help="Judge spec YAML files.")]) -> None:
    """Report every problem in judge spec files as file:line: field: message."""
    from cai.judge_spec import lint

    total = 0
    for f in files:
        problems = lint(f)
        total += len(problems)
        for p in problems:
            err.print(str(p), markup=False, highlight=False, soft_wrap=True)
        if not problems:
            console.print(f"{f}: ok")
    if total:
        raise typer.Exit(1)


@judge_app.command("schema")
def judge_schema(out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None
                 ) -> None:
    """The JSON Schema of judge spec files."""
    from cai.judge_spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
        console.print(f"wrote {out}")
    else:
        sys.stdout.write(text + "\n")


@judge_app.command("show")
def judge_show(spec: Annotated[str, typer.Argument(help="Judge spec: path or name under judges/.")] =
               "multiple-choice",
               model: Annotated[str | None, typer.Option(help="Tokenizer of this model (default: the spec's).")]
               = None) -> None:
    """The validated spec, its hash, and the answer tokens it reads with the model's tokenizer."""
    from transformers import AutoTokenizer

    from cai.judge import spec_answer_tokens
    from cai.judge_spec import resolve_judge_spec
    from cai.label import load_spec
    from cai.models import ModelNotFoundError, resolve
    from cai.yamlio import SpecError

    try:
        s = load_spec(spec)
        path = resolve(model or s.model)
    except (SpecError, FileNotFoundError, ModelNotFoundError) as e:
        fail(str(e))
    answer = spec_answer_tokens(s, AutoTokenizer.from_pretrained(path))
    console.print(f"[bold]{s.name}[/] ({resolve_judge_spec(spec)}): method {s.method}, hash {s.hash}")
    console.print_json(json.dumps(s.model_dump(mode="json")))
    rows = [{"option": o, "token_ids": answer.tokens[o], "tokens": answer.pieces[o]} for o in answer.options]
    print_rows(rows, title=f"answer tokens after {s.prompt.answer_prefix!r} ({model or s.model})")


@app.command("label")
def label(db: DbOption = None,
          judge: Annotated[str, typer.Option(help="Judge spec: path or name under judges/.")] = "multiple-choice",
          constitution: Annotated[str, typer.Option(help="Constitution: path or name.")] = "harmless",
          pairs: Annotated[str, typer.Option(help="Comma-separated: initial_vs_revised, two_samples, contrast.")]
          = "initial_vs_revised,two_samples",
          model: Annotated[str | None, typer.Option(help="Judge model (default: the spec's).")] = None,
          engine: Annotated[str | None, typer.Option(help="transformers | vllm | openai (default: the spec's).")]
          = None,
          base_url: Annotated[str | None, typer.Option(help="Server URL for --engine openai.")] = None,
          engine_option: EngineOptionOption = None,
          shard: ShardOption = None,
          split: Annotated[str | None, typer.Option(help="train | test")] = None,
          limit: Annotated[int | None, typer.Option(help="At most this many pairs.")] = None,
          batch_size: Annotated[int, typer.Option(help="Pairs per engine call and per write.")] = 32,
          seed: Annotated[int, typer.Option(help="Seeds the principle draw per pair.")] = 0,
          changed: Annotated[bool, typer.Option("--changed", help="After editing the constitution: judge again only "
                                                "the pairs its edit touched, carry the other labels over.")]
          = False,
          contrast_model: Annotated[str | None, typer.Option(
              help="contrast pairs: the policy that answers (default: the embedded model).")] = None,
          contrast_limit: Annotated[int | None, typer.Option(help="contrast pairs: at most this many prompts.")]
          = None,
          contrast_pairs_per_prompt: Annotated[int, typer.Option(
              help="contrast pairs: pairs per prompt, each with its own principle and seed.")] = 1,
          confidence: Annotated[float, typer.Option(help="contrast pairs: P(follow answer better).")] = 0.9,
          rescore: Annotated[bool, typer.Option(help="contrast pairs: label with the judge (RLCD-rescore).")]
          = False) -> None:
    """Label pairs of responses with an AI judge into `comparisons` (resumable)."""
    from pydantic import ValidationError

    from cai.label import LabelConfig, run_label
    from cai.models import ModelNotFoundError
    from cai.yamlio import SpecError

    try:
        cfg = LabelConfig(judge=judge, constitution=constitution,
                          pairs=[p.strip() for p in pairs.split(",") if p.strip()], model=model, engine=engine,
                          engine_options=engine_options(base_url, engine_option), shard=shard, split=split, limit=limit,
                          batch_size=batch_size, seed=seed, changed=changed,
                          contrast={"confidence": confidence, "rescore": rescore, "limit": contrast_limit,
                                    "pairs_per_prompt": contrast_pairs_per_prompt,
                                    **({"model": contrast_model} if contrast_model else {})})
    except ValidationError as e:
        fail("; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors()))
    try:
        summary = run_label(_store(db), cfg)
    except (SpecError, FileNotFoundError, ModelNotFoundError, LookupError, StoreLockedError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary))


@app.command("judge-eval")
def judge_eval(file: Annotated[Path, typer.Argument(help="JSONL of human-labelled pairs: prompt, chosen, rejected.")],
               db: DbOption = None,
               spec: Annotated[str, typer.Option(help="Judge spec: path or name under judges/.")] = "multiple-choice",
               engine: Annotated[str | None, typer.Option(help="transformers | vllm | openai (default: the spec's).")]
               = None,
               model: Annotated[str | None, typer.Option(help="Judge model (default: the spec's).")] = None,
               base_url: Annotated[str | None, typer.Option(help="Server URL for --engine openai.")] = None,
               constitution: Annotated[str | None, typer.Option(
                   help="Judge by this constitution's principles (default: the spec's default question).")] = None,
               limit: Annotated[int | None, typer.Option(help="Only the first N pairs.")] = None,
               batch_size: Annotated[int, typer.Option(help="Pairs per engine call.")] = 64,
               seed: int = 0,
               out_dir: Annotated[Path, typer.Option(help="Where the reliability plot and per-item JSONL go.")]
               = Path("data/runs/judge-eval"),
               by: Annotated[list[str] | None, typer.Option(
                   help="Break agreement down by this field of the file (repeatable; default: the subset-like "
                        "fields it has: subset, source, category, agreement, ...).")] = None,
               engine_option: EngineOptionOption = None,
               shard: ShardOption = None) -> None:
    """How well a judge agrees with people, with 95% intervals: agreement beside the longer-answer baseline,
    per subset and per principle; position consistency, calibration, invalid rate."""
    from cai.judge_eval import load_labelled_pairs, run_judge_eval
    from cai.label import find_constitution, judge_engine, load_spec, principle_refs
    from cai.models import ModelNotFoundError
    from cai.sharding import parse_shard
    from cai.yamlio import SpecError

    options = engine_options(base_url, engine_option)
    try:
        parse_shard(shard)
    except ValueError as e:
        fail(f"--shard: {e}")
    store = _store(db)
    try:
        load_labelled_pairs(file, limit)  # a bad file fails before a model is loaded
        s = load_spec(spec)
        from cai.models import resolve_in_store

        model_id, path = resolve_in_store(store, model or s.model)
        principles = chash = None
        if constitution:
            c = find_constitution(constitution)
            principles, chash = principle_refs(c), c.hash
            store.register_constitution(c)
        kind = engine or s.engine
        eng = judge_engine(s, path, kind, options)
        report = run_judge_eval(store, file, s, eng, model_id=model_id, engine_kind=kind, principles=principles,
                                constitution_hash=chash, limit=limit, batch_size=batch_size, seed=seed,
                                out_dir=out_dir, by=by, shard=shard)
    except (SpecError, FileNotFoundError, ModelNotFoundError, LookupError, StoreLockedError) as e:
        fail(str(e))
    m = report.metrics
    table = Table(title=f"judge {report.judge} ({report.method}, spec {report.spec_hash})\n{report.model_id} via "
                        f"{report.engine}, {Path(report.dataset).name}, {report.n} pairs", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    table.add_column("meaning", style="dim")
    explain = [
        ("agreement", "final label prefers the human's choice (valid pairs; a 0.5 tie counts half)"),
        ("length_baseline", "'pick the longer response' on the same valid pairs"),
        ("agreement_minus_length_baseline", "agreement - length baseline, paired (interval: ± 1.96 se)"),
        ("agreement_first_ordering", "one ordering only (A shown first; A is the human's pick half the time)"),
        ("agreement_swapped_ordering", "one ordering only (A shown second)"),
        ("agreement_all_items", "invalid pairs counted as a coin flip"),
        ("position_consistency", "both orderings prefer the same response"),
        ("first_position_rate", "answers that pick whichever is shown first (0.5 = unbiased)"),
        ("brier", "mean (P(A better) - human)^2; 0.25 = always 0.5"),
        ("brier_first_ordering", "Brier of the first ordering alone"),
        ("ece", "expected calibration error, 10 bins"),
        ("ece_first_ordering", "ECE of the first ordering alone"),
        ("mean_confidence", "mean max(P, 1 - P)"),
        ("invalid_rate", "pairs with no valid label"),
        ("n_valid", "pairs with a valid label"),
    ]
    for key, meaning in explain:
        if key in m:
            iv = report.intervals.get(key)
            table.add_row(key, _fmt(m[key]), f"[{iv['low']:.3f}, {iv['high']:.3f}]" if iv and iv["low"] is not None
                          else "", meaning)
    console.print(table)
    if report.accuracy and report.accuracy.groups:
        print_rows([{"field": g.field, "value": g.value, "n": g.accuracy.n, "agreement": g.accuracy.fmt().split(" n=")[0],
                     "longer answer": g.length_baseline.fmt().split(" n=")[0]} for g in report.accuracy.groups],
                   title="per subset (95% Wilson intervals)")
    if report.invalid_reasons:
        console.print("invalid: " + ", ".join(f"{k} {v}" for k, v in sorted(report.invalid_reasons.items())))
    if report.per_principle:
        print_rows([{"principle": r["principle"], "n": r["n"], "invalid": r["invalid"],
                     "agreement": _fmt(r["agreement"]) + (f" [{r['agreement_low']:.3f}, {r['agreement_high']:.3f}]"
                                                          if r["agreement_low"] is not None else ""),
                     "longer answer": _fmt(r["length_baseline"]), "position_consistency": _fmt(r["position_consistency"])}
                    for r in report.per_principle], title="per principle (95% Wilson intervals)")
    console.print(f"{report.pairs_per_second} pairs/s ({report.seconds:.1f}s in all); "
                  f"answer tokens {report.details['answer_tokens']}")
    console.print(f"reliability plot: {report.plot}\nper-item results: {report.items_file}\n"
                  f"{report.evaluation_rows} rows written to evaluations in {store.path} "
                  f"(`cai sql \"select metric, value from judge_quality where judge_spec_hash = '{report.spec_hash}'\"`)",
                  soft_wrap=True, markup=False, highlight=False)


@app.command("export")
def export(out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .jsonl or .parquet.")],
           db: DbOption = None,
           format: Annotated[str, typer.Option("--format", "-f", help="trl: prompt/chosen/rejected preference data.")]
           = "trl",
           style: Annotated[str, typer.Option(help="conversational (message lists) | standard (plain text)")]
           = "conversational",
           judge: Annotated[str | None, typer.Option(help="Only this judge (name or spec hash).")] = None,
           pair_kind: Annotated[str | None, typer.Option(help="initial_vs_revised | two_samples")] = None,
           min_probability: Annotated[float, typer.Option(help="Only pairs with P(chosen better) >= this.")] = 0.5,
           consistent_only: Annotated[bool, typer.Option(help="Only position-consistent comparisons.")] = False,
           minimal: Annotated[bool, typer.Option(help="Only prompt/chosen/rejected columns.")] = False) -> None:
    """Export preference pairs (the `preferences` view) for TRL / Hugging Face datasets."""
    from cai.export import export_trl

    if format != "trl":
        fail(f"unknown --format {format!r}; use trl")
    if style not in ("conversational", "standard"):
        fail(f"unknown --style {style!r}; use conversational or standard")
    store = _store(db)
    if not store.path.exists():
        fail(f"{store.path} does not exist yet")
    try:
        n = export_trl(store, out, style=style, judge=judge, pair_kind=pair_kind, min_probability=min_probability,
                       consistent_only=consistent_only, minimal=minimal)
    except (ValueError, StoreLockedError) as e:
        fail(str(e))
    console.print(f"wrote {n} preference pairs to {out}")
