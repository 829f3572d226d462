"""Shared glue of the `cai` command line: the root Typer app, the consoles, the --db option and the
helpers every command module uses (open the store, fail with a message, print rows, build a config)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cai.store import Store, default_db_path

app = typer.Typer(help="cai: Constitutional AI / RLAIF pipeline. Data lives in a DuckDB file you can query with SQL.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# Piped output (files, CI logs, tests) gets a wide console instead of rich's default 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)

DbOption = Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: $CAI_DB or data/cai.duckdb).",
                                               envvar="CAI_DB", show_default=False)]


def _store(db: Path | None) -> Store:
    return Store(db or default_db_path())


def _existing_store(db: Path | None) -> Store:
    """The store of a command that only reads: a file that doesn't exist is an error, not a new store."""
    store = _store(db)
    if not store.path.exists():
        fail(f"{store.path} does not exist yet; check --db (or $CAI_DB), or create it with `cai ingest FILE` "
             "or `cai db init`")
    return store


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


def _validation_message(e) -> str:
    return "; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors())



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
        try:
            fields[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            fail(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                 "quote strings that contain ':', '[' or '{'")
    try:
        return cls(**fields)
    except ValidationError as e:
        where = f"{config}: " if config else ""
        fail(where + "; ".join(f"{'.'.join(map(str, x['loc'])) or 'config'}: {x['msg']}" for x in e.errors()))


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3f}"
    return str(v)


def main() -> None:
    app()

