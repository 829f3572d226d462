"""The `cai` command line. Every command calls the same library function a flow or test calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cai.store import Store, StoreLockedError, default_db_path

app = typer.Typer(help="cai: Constitutional AI / RLAIF pipeline. Data lives in a DuckDB file you can query with SQL.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Models: pull the embedded default, list what is available.", no_args_is_help=True)
db_app = typer.Typer(help="The DuckDB store.", no_args_is_help=True)
constitution_app = typer.Typer(help="Constitution files: lint, JSON Schema.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(constitution_app, name="constitution")

# Piped output (files, CI logs, tests) gets a wide console instead of rich's default 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)

DbOption = Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: $CAI_DB or data/cai.duckdb).",
                                               envvar="CAI_DB", show_default=False)]


def _store(db: Path | None) -> Store:
    return Store(db or default_db_path())


def fail(message: str, code: int = 1) -> None:
    err.print("[bold red]error:[/] ", end="")
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_rows(rows: list[dict], title: str | None = None, max_width: int = 60) -> None:
    table = Table(title=title, show_lines=False)
    cols = list(rows[0].keys()) if rows else []
    for c in cols:
        table.add_column(str(c), overflow="fold", max_width=max_width)
    for r in rows:
        table.add_row(*["NULL" if r[c] is None else str(r[c]) for c in cols])
    console.print(table)


# ---- models ------------------------------------------------------------------------------
@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="Built-in model name.")] = "smollm2-135m-instruct",
                force: Annotated[bool, typer.Option(help="Convert again even if present.")] = False) -> None:
    """Materialise a built-in model as a Hugging Face checkpoint in the cache (once)."""
    from cai import models

    try:
        already = models.is_pulled(name) and not force
        path = models.pull(name, force=force)
    except models.ModelNotFoundError as e:
        fail(str(e))
    console.print(f"{'already there' if already else 'ready'}: {name} -> {path}")


@models_app.command("list")
def models_list(db: DbOption = None) -> None:
    """Built-in models and the models registered in the store."""
    from cai import models

    print_rows(models.list_models(), title="built-in models", max_width=80)
    store = _store(db)
    if store.path.exists():
        rows = store.query("SELECT model_id, kind, path, base_model_id, created_at FROM models ORDER BY created_at")
        if rows:
            print_rows(rows, title=f"models in {store.path}", max_width=80)


# ---- constitutions -----------------------------------------------------------------------
@constitution_app.command("lint")
def constitution_lint(files: Annotated[list[Path], typer.Argument(help="Constitution YAML files.")]) -> None:
    """Report every problem in constitution files as file:line: field: message."""
    from cai.constitution import lint

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


@constitution_app.command("schema")
def constitution_schema(out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None
                        ) -> None:
    """The JSON Schema of constitution files (for editor autocompletion)."""
    from cai.constitution import json_schema

    text = json.dumps(json_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
        console.print(f"wrote {out}")
    else:
        sys.stdout.write(text + "\n")


# ---- store -------------------------------------------------------------------------------
@db_app.command("info")
def db_info(db: DbOption = None) -> None:
    """Tables and views, row counts, schema version."""
    store = _store(db)
    try:
        info = store.info()
    except StoreLockedError as e:
        fail(str(e))
    console.print(f"[bold]{info['path']}[/]  schema version {info['schema_version']}, {info['bytes'] / 1e6:.1f} MB",
                  soft_wrap=True)
    print_rows(info["tables"])


@db_app.command("init")
def db_init(db: DbOption = None) -> None:
    """Create the file, or migrate it to this version's schema."""
    store = _store(db)
    store.init()
    console.print(f"{store.path}: schema up to date")


@app.command("sql")
def sql(query: Annotated[str, typer.Argument(help="SQL to run (read-only).")],
        db: DbOption = None,
        format: Annotated[str, typer.Option("--format", "-f", help="table | csv | json | parquet")] = "table",
        out: Annotated[Path | None, typer.Option(help="Write the result to this file.")] = None,
        wait: Annotated[float, typer.Option(help="Seconds to wait for a writer to release the file.")] = 30.0,
        max_rows: Annotated[int, typer.Option(help="Rows shown in table format.")] = 100) -> None:
    """Run a read-only SQL query against the store (waits briefly if a stage is writing)."""
    import duckdb

    fmt = format.lower()
    if fmt not in {"table", "csv", "json", "parquet"}:
        fail(f"unknown --format {format!r}; use table, csv, json or parquet")
    if fmt == "parquet" and not out:
        fail("--format parquet needs --out FILE")
    store = _store(db)
    if not store.path.exists():
        fail(f"{store.path} does not exist yet; run `cai ingest FILE` or `cai db init` first")
    store.lock_timeout = wait
    try:
        with store.read() as con:
            rel = con.sql(query)
            if rel is None:
                fail("the statement returned no rows to show")
            if fmt == "parquet":
                rel.write_parquet(str(out))
                console.print(f"wrote {out}")
                return
            cols = rel.columns
            rows = rel.fetchall()
    except StoreLockedError as e:
        fail(str(e))
    except duckdb.Error as e:
        fail(f"{type(e).__name__}: {e}")
    records = [dict(zip(cols, r, strict=True)) for r in rows]
    if fmt == "table":
        if out:
            fail("--out needs --format csv, json or parquet")
        print_rows(records[:max_rows])
        if len(records) > max_rows:
            console.print(f"... {len(records) - max_rows} more rows (use --max-rows or --format csv)")
        return
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")  # not the csv module's default CRLF: shell tools expect \n
        w.writerow(cols)
        w.writerows(rows)
        text = buf.getvalue()
    else:
        text = "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in records) + ("\n" if records else "")
    if out:
        out.write_text(text)
        console.print(f"wrote {len(records)} rows to {out}")
    else:
        sys.stdout.write(text)


@app.command("ingest")
def ingest(files: Annotated[list[Path], typer.Argument(help="JSONL, CSV or Parquet files of prompts.")],
           db: DbOption = None,
           skip_invalid: Annotated[bool, typer.Option(help="Load the good records, report the bad.")] = False,
           test_fraction: Annotated[float, typer.Option(help="Share of prompts held out as split 'test'.")] = 0.1,
           category: Annotated[str | None, typer.Option(help="Category for records that have none.")] = None
           ) -> None:
    """Load prompts ('prompt' text or 'messages' list per record) into the store."""
    from cai.ingest import IngestError, ingest_file

    store = _store(db)
    for f in files:
        try:
            r = ingest_file(store, f, skip_invalid=skip_invalid, test_fraction=test_fraction, category=category)
        except (IngestError, FileNotFoundError) as e:
            fail(str(e))
        console.print(f"{f}: {r.read} read, {r.inserted} new, {r.already_present} already present"
                      + (f", {r.duplicates_in_file} duplicates in file" if r.duplicates_in_file else "")
                      + (f", {len(r.skipped)} skipped" if r.skipped else ""))
        for b in r.skipped:
            err.print(f"  skipped {f}:{b.line}: {b.reason}", markup=False, highlight=False)


@app.command("generate")
def generate(db: DbOption = None,
             model: Annotated[str, typer.Option(help="Built-in name, store model id, or HF folder.")] = "smollm2-135m-instruct",
             engine: Annotated[str, typer.Option(help="transformers | vllm | openai")] = "transformers",
             base_url: Annotated[str | None, typer.Option(help="Server URL for --engine openai.")] = None,
             n: Annotated[int, typer.Option(help="Responses per prompt.")] = 1,
             temperature: float = 0.7, top_p: float = 0.95,
             max_tokens: Annotated[int, typer.Option(help="Max new tokens per response.")] = 256,
             seed: int = 0,
             split: Annotated[str | None, typer.Option(help="train | test")] = None,
             category: Annotated[str | None, typer.Option(help="Only prompts of this category.")] = None,
             limit: Annotated[int | None, typer.Option(help="At most this many prompts.")] = None,
             batch_size: Annotated[int, typer.Option(help="Prompts per engine call and per write.")] = 64) -> None:
    """Sample responses from a policy model for the stored prompts (resumable)."""
    from pydantic import ValidationError

    from cai.generate import GenerateConfig, run_generate
    from cai.models import ModelNotFoundError

    try:
        cfg = GenerateConfig(model=model, engine=engine, n=n, temperature=temperature, top_p=top_p,
                             max_tokens=max_tokens, seed=seed, split=split, category=category, limit=limit,
                             batch_size=batch_size,
                             engine_options={"base_url": base_url} if base_url else {})
    except ValidationError as e:
        fail("; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors()))
    try:
        summary = run_generate(_store(db), cfg)
    except (ModelNotFoundError, LookupError, StoreLockedError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary))


# ---- SL-CAI: `cai critique`, `cai sft` (issue 3) -------------------------------------------
def _validation_message(e) -> str:
    return "; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors())


def _print_critique_report(store: Store, constitution_hash: str | None = None) -> None:
    from cai.critique import critique_report

    rows = critique_report(store, constitution_hash)
    if not rows:
        console.print(f"no revisions in {store.path} yet; run `cai critique`")
        return
    print_rows(rows, title="critique rounds per principle (status counts)")
    total = sum(r["rounds"] for r in rows)
    ok = sum(r["ok"] for r in rows)
    console.print(f"{ok} of {total} rounds ok ({ok / total:.0%}); `cai sql \"select status, reason, count(*) "
                  f"from revisions group by all\"` shows why the others were not", soft_wrap=True, markup=False)


@app.command("critique")
def critique(db: DbOption = None,
             constitution: Annotated[str, typer.Option(help="Constitution: path or name under constitutions/.")]
             = "constitutions/harmless.yaml",
             model: Annotated[str, typer.Option(help="Model that critiques and revises: built-in name, store "
                                                     "model id or HF folder.")] = "smollm2-135m-instruct",
             engine: Annotated[str, typer.Option(help="transformers | vllm | openai")] = "transformers",
             base_url: Annotated[str | None, typer.Option(help="Server URL for --engine openai.")] = None,
             rounds: Annotated[int, typer.Option(help="Critique-revision rounds per generation.")] = 2,
             few_shot: Annotated[int | None, typer.Option(help="Constitution examples placed first "
                                                               "(default: all).")] = None,
             temperature: float = 0.7, top_p: float = 0.95,
             critique_max_tokens: Annotated[int, typer.Option(help="Max new tokens per critique.")] = 128,
             revision_max_tokens: Annotated[int, typer.Option(help="Max new tokens per revision.")] = 256,
             seed: int = 0,
             max_revision_chars: Annotated[int | None, typer.Option(help="Longer revisions are 'too_long'.")]
             = 4000,
             max_growth: Annotated[float | None, typer.Option(help="Revisions more than this many times as long "
                                                                   "as what they revise are 'too_long'.")] = 4.0,
             generation_model: Annotated[str | None, typer.Option(help="Only generations of this model id.")]
             = None,
             split: Annotated[str | None, typer.Option(help="train | test")] = None,
             category: Annotated[str | None, typer.Option(help="Only prompts of this category.")] = None,
             limit: Annotated[int | None, typer.Option(help="At most this many generations.")] = None,
             batch_size: Annotated[int, typer.Option(help="Generations per engine call and per write.")] = 256,
             report: Annotated[bool, typer.Option("--report", help="Only print how the rounds went, per "
                                                                   "principle, and exit.")] = False) -> None:
    """Critique and revise initial generations by sampled constitution principles (SL-CAI; resumable)."""
    from pydantic import ValidationError

    from cai.critique import CritiqueConfig, run_critique
    from cai.models import ModelNotFoundError
    from cai.yamlio import SpecError

    store = _store(db)
    if report:
        if not store.path.exists():
            fail(f"{store.path} does not exist yet")
        _print_critique_report(store)
        return
    try:
        cfg = CritiqueConfig(constitution=constitution, model=model, engine=engine, rounds=rounds, few_shot=few_shot,
                             temperature=temperature, top_p=top_p, critique_max_tokens=critique_max_tokens,
                             revision_max_tokens=revision_max_tokens, seed=seed,
                             max_revision_chars=max_revision_chars, max_growth=max_growth,
                             generation_model=generation_model, split=split, category=category, limit=limit,
                             batch_size=batch_size, engine_options={"base_url": base_url} if base_url else {})
    except ValidationError as e:
        fail(_validation_message(e))
    try:
        summary = run_critique(store, cfg)
    except (ModelNotFoundError, LookupError, StoreLockedError, SpecError, FileNotFoundError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary, default=str))
    _print_critique_report(store, summary["constitution_hash"])


SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Any other config field as KEY=VALUE (YAML value), repeatable: --set gamma=0.99.")]
ConfigFileOption = Annotated[Path | None, typer.Option(
    "--config", help="YAML/JSON file of the stage's config fields (options and --set given here win).")]


def _train_config(cls, explicit: dict, sets: list[str] | None = None, config: Path | None = None):
    """Build a stage's pydantic config from a --config file, then CLI flags (None = not given), then
    --set KEY=VALUE pairs; a bad value fails with the field's name and what is wrong."""
    import yaml
    from pydantic import ValidationError

    fields: dict = {}
    if config is not None:
        if not config.exists():
            fail(f"{config}: no such file")
        try:
            fields = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as e:
            fail(f"{config}: not valid YAML: {e}")
        if not isinstance(fields, dict):
            fail(f"{config}: expected a mapping of {cls.__name__} fields")
    fields |= {k: v for k, v in explicit.items() if v is not None}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set {item!r}: use KEY=VALUE")
        fields[key.strip().replace("-", "_")] = yaml.safe_load(value)
    try:
        return cls(**fields)
    except ValidationError as e:
        where = f"{config}: " if config else ""
        fail(where + "; ".join(f"{'.'.join(map(str, x['loc'])) or 'config'}: {x['msg']}" for x in e.errors()))


@app.command("sft")
def sft(db: DbOption = None,
        base_model: Annotated[str | None, typer.Option(help="Policy to fine-tune: built-in name, store model id "
                                                            "or HF folder (default: the embedded model).")] = None,
        model_id: Annotated[str | None, typer.Option(help="Id of the new model (default: sft-<hash>).")] = None,
        output_dir: Annotated[Path | None, typer.Option(help="Model folder (default: <db dir>/models/<id>).")]
        = None,
        constitution: Annotated[str | None, typer.Option(help="Only revisions under this constitution hash.")]
        = None,
        revision_model: Annotated[str | None, typer.Option(help="Only revisions written by this model id.")]
        = None,
        split: Annotated[str | None, typer.Option(help="Prompts of this split (default train; 'all' for all).")]
        = None,
        limit: Annotated[int | None, typer.Option(help="At most this many pairs.")] = None,
        val_fraction: Annotated[float | None, typer.Option(help="Share of prompts for validation.")] = None,
        max_length: Annotated[int | None, typer.Option(help="Tokens per example.")] = None,
        lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-5; 2e-4 with LoRA).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Examples per micro-batch.")] = None,
        grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
        epochs: Annotated[int | None, typer.Option()] = None,
        max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        lora: Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapters (merged at the end) or "
                                                                        "full fine-tuning.")] = None,
        lora_r: Annotated[int | None, typer.Option()] = None,
        gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing")] = None,
        mixed_precision: Annotated[str | None, typer.Option(help="auto | no | bf16")] = None,
        device: Annotated[str | None, typer.Option(help="cuda | cpu (default: cuda if available).")] = None,
        eval_every: Annotated[int | None, typer.Option(help="Steps between validation passes.")] = None,
        save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
        stop_after: Annotated[int | None, typer.Option(help="Checkpoint and stop after this many steps; the "
                                                            "same command resumes.")] = None,
        sets: SetOption = None,
        config: ConfigFileOption = None) -> None:
    """Fine-tune the policy on the SL-CAI pairs (`sl_cai`: prompt, final revision); resumes if interrupted."""
    from cai.models import ModelNotFoundError
    from cai.sft import SFTConfig, run_sft

    # `--split all` means no split filter: the config's None, which a flag (None = not given) can't carry.
    if split == "all":
        split, sets = None, ["split=null", *(sets or [])]
    cfg = _train_config(SFTConfig, dict(
        base_model=base_model, model_id=model_id, output_dir=str(output_dir) if output_dir else None,
        constitution_hash=constitution, revision_model=revision_model, limit=limit, val_fraction=val_fraction,
        max_length=max_length, lr=lr, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
        max_steps=max_steps, seed=seed, lora=lora, lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
        mixed_precision=mixed_precision, device=device, eval_every=eval_every, save_every=save_every,
        split=split), sets, config)
    try:
        summary = run_sft(_store(db), cfg, stop_after_steps=stop_after)
    except (ModelNotFoundError, LookupError, StoreLockedError, RuntimeError, ValueError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary, default=str))
    if summary.get("finished") or summary.get("already_trained"):
        console.print(f"sample from it: cai generate --model {summary['model_id']}", markup=False)


# ---- judging: judge specs, `cai label`, `cai judge-eval`, `cai export` (issue 4) -------------
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
          pairs: Annotated[str, typer.Option(help="Comma-separated: initial_vs_revised, two_samples.")]
          = "initial_vs_revised,two_samples",
          model: Annotated[str | None, typer.Option(help="Judge model (default: the spec's).")] = None,
          engine: Annotated[str | None, typer.Option(help="transformers | vllm | openai (default: the spec's).")]
          = None,
          base_url: Annotated[str | None, typer.Option(help="Server URL for --engine openai.")] = None,
          split: Annotated[str | None, typer.Option(help="train | test")] = None,
          limit: Annotated[int | None, typer.Option(help="At most this many pairs.")] = None,
          batch_size: Annotated[int, typer.Option(help="Pairs per engine call and per write.")] = 32,
          seed: Annotated[int, typer.Option(help="Seeds the principle draw per pair.")] = 0) -> None:
    """Label pairs of responses with an AI judge into `comparisons` (resumable)."""
    from pydantic import ValidationError

    from cai.label import LabelConfig, run_label
    from cai.models import ModelNotFoundError
    from cai.yamlio import SpecError

    try:
        cfg = LabelConfig(judge=judge, constitution=constitution,
                          pairs=[p.strip() for p in pairs.split(",") if p.strip()], model=model, engine=engine,
                          engine_options={"base_url": base_url} if base_url else {}, split=split, limit=limit,
                          batch_size=batch_size, seed=seed)
    except ValidationError as e:
        fail("; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors()))
    try:
        summary = run_label(_store(db), cfg)
    except (SpecError, FileNotFoundError, ModelNotFoundError, LookupError, StoreLockedError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary))


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3f}"
    return str(v)


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
               = Path("data/runs/judge-eval")) -> None:
    """How well a judge agrees with people: agreement, position consistency, calibration, invalid rate."""
    from cai.judge_eval import load_labelled_pairs, run_judge_eval
    from cai.label import find_constitution, judge_engine, load_spec, principle_refs
    from cai.models import ModelNotFoundError
    from cai.yamlio import SpecError

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
        eng = judge_engine(s, path, kind, {"base_url": base_url} if base_url else {})
        report = run_judge_eval(store, file, s, eng, model_id=model_id, engine_kind=kind, principles=principles,
                                constitution_hash=chash, limit=limit, batch_size=batch_size, seed=seed,
                                out_dir=out_dir)
    except (SpecError, FileNotFoundError, ModelNotFoundError, LookupError, StoreLockedError) as e:
        fail(str(e))
    m = report.metrics
    table = Table(title=f"judge {report.judge} ({report.method}, spec {report.spec_hash})\n{report.model_id} via "
                        f"{report.engine}, {Path(report.dataset).name}, {report.n} pairs", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("meaning", style="dim")
    explain = [
        ("agreement", "final label prefers the human's choice (valid pairs; a 0.5 tie counts half)"),
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
            table.add_row(key, _fmt(m[key]), meaning)
    console.print(table)
    if report.invalid_reasons:
        console.print("invalid: " + ", ".join(f"{k} {v}" for k, v in sorted(report.invalid_reasons.items())))
    if report.per_principle:
        print_rows([{k: _fmt(v) for k, v in r.items()} for r in report.per_principle], title="per principle")
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


# ---- reward model: `cai train-rm`, `cai rm score`, `cai rm eval` (issue 5) ------------------
rm_app = typer.Typer(help="Reward models: score (prompt, response) rows, evaluate on human-labelled pairs.",
                     no_args_is_help=True)
app.add_typer(rm_app, name="rm")


@app.command("train-rm")
def train_rm(db: DbOption = None,
             base_model: Annotated[str | None, typer.Option(help="Built-in name, store model id or HF folder "
                                                            "(default: the embedded policy model).")] = None,
             model_id: Annotated[str | None, typer.Option(help="Id of the new model (default: rm-<hash>).")] = None,
             output_dir: Annotated[Path | None, typer.Option(help="Model folder (default: <db dir>/models/<id>).")]
             = None,
             judge: Annotated[str | None, typer.Option(help="Only comparisons of this judge spec hash.")] = None,
             constitution: Annotated[str | None, typer.Option(help="Only comparisons under this constitution hash.")]
             = None,
             pair_kind: Annotated[str | None, typer.Option(help="Only comparisons of this pair kind.")] = None,
             min_confidence: Annotated[float | None, typer.Option(help="Drop labels with max(p, 1-p) below this.")]
             = None,
             limit: Annotated[int | None, typer.Option(help="At most this many comparisons.")] = None,
             val_fraction: Annotated[float | None, typer.Option(help="Share of prompts for validation.")] = None,
             max_length: Annotated[int | None, typer.Option(help="Tokens per sequence (left-truncated).")] = None,
             hard_labels: Annotated[bool | None, typer.Option("--hard-labels/--soft-labels",
                                                              help="Train on 1[p>0.5] instead of p.")] = None,
             margin: Annotated[float | None, typer.Option(help="Margin, scaled by the label's confidence.")] = None,
             center_coef: Annotated[float | None, typer.Option(help="Reward-centring penalty weight.")] = None,
             lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-5; 2e-4 with LoRA).")]
             = None,
             batch_size: Annotated[int | None, typer.Option(help="Pairs per micro-batch.")] = None,
             grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
             epochs: Annotated[int | None, typer.Option()] = None,
             max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
             seed: Annotated[int | None, typer.Option()] = None,
             lora: Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapters or full fine-tuning.")]
             = None,
             lora_r: Annotated[int | None, typer.Option()] = None,
             gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing")] = None,
             mixed_precision: Annotated[str | None, typer.Option(help="auto | no | bf16")] = None,
             device: Annotated[str | None, typer.Option(help="cuda | cpu (default: cuda if available).")] = None,
             eval_every: Annotated[int | None, typer.Option(help="Steps between validation passes.")] = None,
             save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
             stop_after: Annotated[int | None, typer.Option(help="Checkpoint and stop after this many steps; "
                                                            "the same command resumes.")] = None,
             sets: SetOption = None,
             config: ConfigFileOption = None) -> None:
    """Train a reward model on the judge's soft labels (comparisons in the store); resumes if interrupted."""
    from cai.models import ModelNotFoundError
    from cai.reward import RewardConfig, train_reward

    cfg = _train_config(RewardConfig, dict(
        base_model=base_model, model_id=model_id, output_dir=str(output_dir) if output_dir else None,
        judge_spec_hash=judge, constitution_hash=constitution, pair_kind=pair_kind, min_confidence=min_confidence,
        limit=limit, val_fraction=val_fraction, max_length=max_length, hard_labels=hard_labels, margin=margin,
        center_coef=center_coef, lr=lr, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
        max_steps=max_steps, seed=seed, lora=lora, lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
        mixed_precision=mixed_precision, device=device, eval_every=eval_every, save_every=save_every), sets, config)
    try:
        summary = train_reward(_store(db), cfg, stop_after_steps=stop_after)
    except (ModelNotFoundError, LookupError, StoreLockedError, RuntimeError, ValueError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary, default=str))


@rm_app.command("score")
def rm_score(model: Annotated[str, typer.Option(help="Reward model: store model id or folder.")],
             file: Annotated[Path | None, typer.Argument(help="JSONL: prompt (or messages) and response, or "
                                                         "chosen/rejected pairs. Without it: rows of the store.")]
             = None,
             db: DbOption = None,
             sql: Annotated[str | None, typer.Option(help="Store query returning messages (or prompt) and "
                                                   "response (default: every generation).")] = None,
             out: Annotated[Path | None, typer.Option(help="Write JSONL with the rewards here.")] = None,
             limit: Annotated[int | None, typer.Option(help="At most this many rows.")] = None,
             batch_size: Annotated[int, typer.Option(help="Sequences per forward.")] = 16,
             raw: Annotated[bool, typer.Option(help="Do not subtract the stored offset.")] = False) -> None:
    """Score (prompt, response) rows from a file or the store with a reward model."""
    import statistics

    from cai.models import ModelNotFoundError
    from cai.rm import PairsFileError, RewardModel, score_file, score_store

    store = _store(db)
    try:
        rm = RewardModel.load(model, store=store)
        if raw:
            rm.offset = 0.0
        rows = (score_file(rm, file, limit=limit, batch_size=batch_size) if file
                else score_store(rm, store, sql=sql, limit=limit, batch_size=batch_size))
    except (ModelNotFoundError, PairsFileError, FileNotFoundError, ValueError, StoreLockedError) as e:
        fail(str(e))
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    keys = [k for k in ("reward", "reward_chosen", "reward_rejected") if any(k in r for r in rows)]
    if out:
        out.write_text(text)
        console.print(f"wrote {len(rows)} scored rows to {out}")
    elif not sys.stdout.isatty():
        sys.stdout.write(text)
        return
    else:
        print_rows([{"id": r.get("id"), **{k: round(r[k], 4) if k in r else None for k in keys}} for r in rows[:50]])
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        err.print(f"{k}: n={len(vals)} mean={statistics.fmean(vals):.4f} "
                  f"std={statistics.pstdev(vals):.4f} min={min(vals):.4f} max={max(vals):.4f}")


@rm_app.command("eval")
def rm_eval(file: Annotated[Path, typer.Argument(help="JSONL of human-labelled pairs: prompt, chosen, rejected "
                                                 "(the judge-eval format).")],
            model: Annotated[str, typer.Option(help="Reward model: store model id or folder.")],
            db: DbOption = None,
            limit: Annotated[int | None, typer.Option(help="Only the first N pairs.")] = None,
            batch_size: Annotated[int, typer.Option(help="Sequences per forward.")] = 16) -> None:
    """Accuracy of a reward model on human-labelled pairs (r(chosen) > r(rejected)); saved to `evaluations`."""
    from cai.models import ModelNotFoundError
    from cai.rm import PairsFileError, evaluate_human_pairs

    try:
        summary = evaluate_human_pairs(_store(db), model, file, limit=limit, batch_size=batch_size)
    except (ModelNotFoundError, PairsFileError, FileNotFoundError, StoreLockedError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary, default=str))


# ---- pipeline and Prefect ---------------------------------------------------------------
@app.command("run")
def run(run_file: Annotated[Path, typer.Argument(help="Pipeline run file (YAML), e.g. flows/demo.yaml.")],
        stages: Annotated[str | None, typer.Option(help="Comma-separated subset of the file's stages.")] = None,
        check: Annotated[bool, typer.Option("--check", help="Only validate the run file.")] = False) -> None:
    """Run the pipeline a run file describes, as the Prefect flow `cai_pipeline` (ephemeral mode
    unless PREFECT_API_URL points at a server)."""
    from cai.pipeline import load_pipeline
    from cai.yamlio import SpecError

    try:
        cfg = load_pipeline(run_file)
    except SpecError as e:
        fail(str(e))
    if check:
        console.print(f"{run_file}: ok; stages: {', '.join(cfg.ordered_stages())}")
        return
    from flows.pipeline import run_pipeline

    only = [s.strip() for s in stages.split(",")] if stages else None
    result = run_pipeline(run_file, only)
    console.print_json(json.dumps(result, default=str))


@app.command("serve")
def serve(flow: Annotated[str, typer.Argument(help="cai_pipeline | label_new_prompts | retrain_reward_model | evaluate_policy")],
          run_file: Annotated[str, typer.Option(help="Run file passed to the flow.")] = "flows/demo.yaml",
          cron: Annotated[str | None, typer.Option(help="Cron schedule, e.g. '0 2 * * *'.")] = None,
          interval: Annotated[float | None, typer.Option(help="Seconds between runs.")] = None,
          name: Annotated[str | None, typer.Option(help="Deployment name.")] = None) -> None:
    """Serve a flow on a schedule from this process (needs a Prefect server: PREFECT_API_URL)."""
    from flows import serve as serving

    try:
        serving.serve(flow, deployment=name, cron=cron, interval=interval, parameters={"run_file": run_file})
    except (KeyError, ValueError, RuntimeError) as e:
        fail(str(e))


@app.command("deploy")
def deploy(names: Annotated[list[str] | None, typer.Argument(help="Deployment names (default: all).")] = None
           ) -> None:
    """Register the scheduled deployments of flows/prefect.yaml on a process work pool."""
    from flows import serve as serving

    try:
        code = serving.deploy(names=names or None)
    except RuntimeError as e:
        fail(str(e))
    if code:
        raise typer.Exit(code)
    console.print(f"deployed; start a worker with: prefect worker start --pool {serving.WORK_POOL}")


# ---- PPO and DPO (cai/ppo.py, cai/dpo.py) -------------------------------------------------
@app.command("ppo")
def ppo(db: DbOption = None,
        policy: Annotated[str | None, typer.Option(help="Starting policy (built-in name, store id, HF folder).")] = None,
        reward: Annotated[str | None, typer.Option(help="Reward model (store id or folder), judge:SPEC, or "
                                                        "python:module:function.")] = None,
        ref: Annotated[str | None, typer.Option(help="Reference policy (default: the starting policy).")] = None,
        value_model: Annotated[str | None, typer.Option(help="Critic start (default: the reward model).")] = None,
        steps: Annotated[int | None, typer.Option(help="PPO steps (one rollout batch each).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Rollouts per step.")] = None,
        samples_per_prompt: Annotated[int | None, typer.Option(help="Responses per prompt in a batch (scores "
                                                                    "compared within the prompt).")] = None,
        minibatch_size: Annotated[int | None, typer.Option(help="Rollouts per gradient step.")] = None,
        ppo_epochs: Annotated[int | None, typer.Option(help="Passes over each rollout batch.")] = None,
        max_new_tokens: Annotated[int | None, typer.Option(help="Response length limit.")] = None,
        temperature: float | None = None,
        learning_rate: float | None = None,
        kl_coef: Annotated[float | None, typer.Option(help="beta of the per-token KL penalty.")] = None,
        target_kl: Annotated[float | None, typer.Option(help="Adaptive KL target (nats); 0 keeps beta fixed.")] = None,
        missing_eos_penalty: Annotated[float | None, typer.Option(help="Penalty for responses without EOS.")] = None,
        limit: Annotated[int | None, typer.Option(help="At most this many training prompts.")] = None,
        engine: Annotated[str | None, typer.Option(help="Rollout engine: transformers | vllm.")] = None,
        device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
        dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 (autocast)")] = None,
        threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
        seed: int | None = None,
        resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of the same setup.")] = True,
        sets: SetOption = None,
        config: ConfigFileOption = None) -> None:
    """Fine-tune a policy with PPO against a reward model (or judge / Python reward)."""
    from cai.models import ModelNotFoundError
    from cai.ppo import PPOConfig, PPOError, run_ppo

    cfg = _train_config(PPOConfig, {
        "policy": policy, "reward": reward, "ref": ref, "value_model": value_model, "steps": steps,
        "batch_size": batch_size, "samples_per_prompt": samples_per_prompt, "minibatch_size": minibatch_size,
        "ppo_epochs": ppo_epochs, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "learning_rate": learning_rate,
        "kl_coef": kl_coef, "missing_eos_penalty": missing_eos_penalty, "limit": limit,
        "rollout_engine": engine, "device": device, "dtype": dtype, "threads": threads, "seed": seed,
        "resume": resume}, sets, config)
    if target_kl is not None:
        cfg.target_kl = target_kl or None
    try:
        summary = run_ppo(_store(db), cfg)
    except PPOError as e:
        fail(f"training stopped: {e}")
    except (ModelNotFoundError, LookupError, ValueError, NotImplementedError, StoreLockedError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary, default=str))
    if "eval_reward_gain" in summary:
        err.print(f"held-out reward {summary['eval_reward_start']:.4f} -> {summary['eval_reward_end']:.4f}: "
                  f"paired gain {summary['eval_reward_gain']:+.4f} ± {summary['eval_reward_gain_se']:.4f} "
                  f"(standard error over {summary['eval_reward_gain_prompts']} held-out prompts)", highlight=False)
    if summary.get("plot"):
        err.print(f"training curves: {summary['plot']}\n"
                  f"  cai sql \"select step, split, metric, value from training_curves where run_id = "
                  f"'{summary['run_id']}' and metric in ('reward', 'kl') order by step\"", highlight=False)


@app.command("dpo")
def dpo(db: DbOption = None,
        policy: Annotated[str | None, typer.Option(help="Starting policy (built-in name, store id, HF folder).")] = None,
        ref: Annotated[str | None, typer.Option(help="Reference (default: the starting policy).")] = None,
        beta: float | None = None,
        label_mode: Annotated[str | None, typer.Option(help="smoothing | weight | hard: how the soft label "
                                                            "P(chosen better) enters the loss.")] = None,
        epochs: int | None = None,
        batch_size: Annotated[int | None, typer.Option(help="Pairs per optimiser step.")] = None,
        micro_batch_size: Annotated[int | None, typer.Option(help="Pairs per forward pass.")] = None,
        learning_rate: float | None = None,
        judge: Annotated[str | None, typer.Option(help="Only labels from this judge name.")] = None,
        pair_kind: Annotated[str | None, typer.Option(help="Only pairs of this kind.")] = None,
        limit: Annotated[int | None, typer.Option(help="At most this many training pairs.")] = None,
        device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
        threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
        seed: int | None = None,
        sets: SetOption = None,
        config: ConfigFileOption = None) -> None:
    """Fine-tune a policy with DPO on the `preferences` view (soft labels as smoothing or weights)."""
    from cai.dpo import DPOConfig, run_dpo
    from cai.models import ModelNotFoundError

    cfg = _train_config(DPOConfig, {
        "policy": policy, "ref": ref, "beta": beta, "label_mode": label_mode, "epochs": epochs,
        "batch_size": batch_size, "micro_batch_size": micro_batch_size, "learning_rate": learning_rate,
        "judge_name": judge, "pair_kind": pair_kind, "limit": limit, "device": device, "threads": threads,
        "seed": seed}, sets, config)
    try:
        summary = run_dpo(_store(db), cfg)
    except FloatingPointError as e:
        fail(f"training stopped: {e}")
    except (ModelNotFoundError, LookupError, ValueError, StoreLockedError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary, default=str))


# ---- evaluation: `cai evaluate` ------------------------------------------------------------
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
             sets: SetOption = None) -> None:
    """Evaluate a policy against its parent on held-out prompts: judge win rate, reward, KL, length,
    refusals, Elo. Rows go to `evaluations`; a markdown report and PNG plots beside the DB."""
    from cai.evaluate import EvaluateConfig, run_evaluate
    from cai.models import ModelNotFoundError
    from cai.yamlio import SpecError

    cfg = _train_config(EvaluateConfig, {
        "policy": policy, "baseline": baseline, "judge": judge, "constitution": constitution,
        "reward_model": reward_model, "engine": engine, "engine_options": {"base_url": base_url} if base_url else None,
        "judge_model": judge_model, "judge_engine": judge_engine, "split": split, "limit": limit,
        "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "batch_size": batch_size,
        "kl_samples": kl_samples}, sets)
    try:
        summary = run_evaluate(_store(db), cfg, plot=plot)
    except (SpecError, FileNotFoundError, ModelNotFoundError, LookupError, ValueError, StoreLockedError) as e:
        fail(str(e))
    baseline_values = summary.get("baseline", {})
    rows = [{"metric": name, "policy": _fmt(value), "baseline": _fmt(baseline_values.get(name))}
            for name, value in summary["metrics"].items()]
    print_rows(rows, title=f"{summary['policy_id']} vs {summary['baseline_id']}", max_width=80)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
