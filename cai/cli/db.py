"""The store: `cai db info`, `cai db init`, `cai sql`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cai.cli.common import DbOption, _existing_store, _store, app, console, fail, print_rows
from cai.store import StoreLockedError

db_app = typer.Typer(help="The DuckDB store.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("info")
def db_info(db: DbOption = None) -> None:
    """Tables and views, row counts, schema version."""
    from cai.runs import reap_stale

    store = _existing_store(db)
    try:
        marked = reap_stale(store)
        info = store.info()
        by_status = store.query("SELECT status, count(*) AS n FROM runs GROUP BY status ORDER BY status")
    except StoreLockedError as e:
        fail(str(e))
    console.print(f"[bold]{info['path']}[/]  schema version {info['schema_version']}, {info['bytes'] / 1e6:.1f} MB",
                  soft_wrap=True)
    print_rows(info["tables"])
    console.print("runs: " + (", ".join(f"{r['n']} {r['status']}" for r in by_status) or "none")
                  + (f" ({marked} just marked stale: their process is gone; see `cai runs`)" if marked else ""),
                  soft_wrap=True)


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
    store = _existing_store(db)
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
