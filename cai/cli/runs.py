"""`cai runs`: the stage invocations in the store, newest first, with the truth about each one."""

from __future__ import annotations

from typing import Annotated

import typer

from cai.cli.common import DbOption, _existing_store, app, console, fail, print_rows
from cai.store import StoreLockedError


@app.command("runs")
def runs_list(db: DbOption = None,
              status: Annotated[str | None, typer.Option(
                  help="Only runs with this status: running, ok, failed, interrupted, stopped, stale.")] = None,
              stage: Annotated[str | None, typer.Option(help="Only runs of this stage.")] = None,
              limit: Annotated[int, typer.Option(help="Rows shown.")] = 30) -> None:
    """List runs (newest first). Runs whose process is gone are marked `stale` first."""
    from cai.runs import reap_stale

    store = _existing_store(db)
    try:
        marked = reap_stale(store)
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if stage:
            where.append("stage = ?")
            args.append(stage)
        rows = store.query(
            "SELECT run_id, stage, status, started_at, finished_at, host, pid, heartbeat_at, "
            "left(coalesce(error, ''), 80) AS error FROM runs"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY started_at DESC LIMIT ?", [*args, limit])
    except StoreLockedError as e:
        fail(str(e))
    if marked:
        console.print(f"marked {marked} run(s) stale: their process is gone")
    print_rows(rows)
