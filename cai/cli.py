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
        w = csv.writer(buf)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
