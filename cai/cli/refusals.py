"""Refusal classifiers: `cai refusals eval` (cai/refusals/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cai.cli.common import app, console, fail

refusals_app = typer.Typer(help="Refusal classifiers: measure them on human-labelled replies.", no_args_is_help=True)
app.add_typer(refusals_app, name="refusals")


def _ci(iv) -> str:
    return iv.fmt(3).rsplit(" n=", 1)[0]


@refusals_app.command("eval")
def refusals_eval(
        file: Annotated[Path, typer.Argument(help="JSONL of {prompt, completion, refusal} (optional model, type), "
                                                  "e.g. ../shared/data/xstest_completions_dev.jsonl.")],
        classifier: Annotated[list[str] | None, typer.Option(
            "--classifier", "-c", help="Classifier name, repeatable (default: every registered one).")] = None,
        limit: Annotated[int | None, typer.Option(help="A seeded random sample of this many rows for every "
                                                       "classifier.")] = None,
        model_limit: Annotated[int | None, typer.Option(
            help="Model-based classifiers (judge, combined) score a seeded sample of this many rows (about 2 s a "
                 "reply on 2 CPU cores); the rules are shown on the same rows too. 0: all rows.")] = 100,
        model: Annotated[str | None, typer.Option(help="Model of the judge classifier (default: the embedded "
                                                       "SmolLM2-135M-Instruct).")] = None,
        engine: Annotated[str, typer.Option(help="Engine of the judge classifier: transformers | vllm | openai.")]
        = "transformers",
        batch_size: Annotated[int, typer.Option(help="Replies per model call.")] = 16,
        seed: int = 0,
        out: Annotated[Path | None, typer.Option(help="Also write every figure (and per-row scores) as JSON.")] = None,
) -> None:
    """Precision, recall and F1 (95 % intervals: Wilson, bootstrap for F1) of refusal classifiers, overall
    and per model and per type of prompt when the file has those fields."""
    from cai.refusals import CLASSIFIERS, DEFAULT, MODEL_BASED
    from cai.refusals.evaluation import evaluate_classifiers, load_labelled_replies

    names = classifier or list(CLASSIFIERS)
    unknown = [n for n in names if n not in CLASSIFIERS]
    if unknown:
        fail(f"unknown classifier {unknown[0]!r}; choose from: {', '.join(CLASSIFIERS)}")
    try:
        rows = load_labelled_replies(file, limit=limit, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    fast = [n for n in names if n not in MODEL_BASED]
    slow = [n for n in names if n in MODEL_BASED]
    options = {"model": model, "engine_kind": engine, "batch_size": batch_size}
    runs = []
    if fast:
        runs.append(("all rows" if limit is None else f"seeded sample of {len(rows)}", rows, fast))
    if slow:
        sub = rows
        if model_limit and model_limit < len(rows):
            import random

            sub = sorted(random.Random(seed).sample(rows, model_limit), key=lambda r: r.line)
        label = f"seeded sample of {len(sub)} (--model-limit)" if len(sub) < len(rows) else runs[0][0] if runs \
            else "all rows"
        runs.append((label, sub, [*slow, *(["rules"] if "rules" not in slow and len(sub) < len(rows) else [])]))
    results = []
    for label, subset, group_names in runs:
        reports = evaluate_classifiers(subset, group_names, seed=seed, options=options)
        results.append((label, subset, reports))
        table = Table(title=f"{file.name}: {label}, {sum(r.refusal for r in subset)} refusals of {len(subset)} replies "
                            "(95 % intervals)")
        for col in ("classifier", "precision", "recall", "F1 (bootstrap)", "accuracy", "seconds"):
            table.add_column(col, justify="left" if col == "classifier" else "right")
        for r in reports:
            m = r.overall
            table.add_row(r.name + (" (default)" if r.name == DEFAULT else ""), _ci(m.precision), _ci(m.recall),
                          _ci(m.f1), _ci(m.accuracy), f"{r.seconds:.1f}")
        console.print(table)
        for group in ("model", "type"):
            present = [r for r in reports if group in r.groups]
            if not present:
                continue
            values = sorted(present[0].groups[group])
            gt = Table(title=f"F1 by {group} ({label})")
            gt.add_column(group)
            gt.add_column("n", justify="right")
            gt.add_column("refusals", justify="right")
            for r in present:
                gt.add_column(r.name, justify="right")
            for v in values:
                first = present[0].groups[group][v]
                gt.add_row(v, str(first.n), str(first.positives), *[_ci(r.groups[group][v].f1) for r in present])
            console.print(gt)
        for r in reports:
            if r.info:
                console.print(f"{r.name}: {json.dumps(r.info, default=str)}", highlight=False, soft_wrap=True)
    if out:
        payload = [{"rows": label, "n": len(subset), "classifiers": [
            {"name": r.name, "overall": r.overall.as_dict(), "seconds": r.seconds, "info": r.info,
             "groups": {g: {v: m.as_dict() for v, m in d.items()} for g, d in r.groups.items()},
             "scores": [{"line": row.line, "refusal": row.refusal, "score": s}
                        for row, s in zip(subset, r.predictions, strict=True)]}
            for r in reports]} for label, subset, reports in results]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1, default=str))
        console.print(f"written: {out}", highlight=False)
