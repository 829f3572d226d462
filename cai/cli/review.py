"""`cai review`: the local review page over the store (see cai/review/)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cai.cli.common import DbOption, app, fail
from cai.store import default_db_path


@app.command("review")
def review(db: DbOption = None,
           port: Annotated[int, typer.Option(help="Port on 127.0.0.1.", min=1, max=65535)] = 8765,
           read_only: Annotated[bool, typer.Option("--read-only", help="Refuse every write (verdicts answer "
                                                                       "HTTP 403).")] = False,
           reviewer: Annotated[str | None, typer.Option(help="Your name: verdicts are stored with judge_name "
                                                             "'human:<name>' (default: your login; the page can "
                                                             "change it).")] = None) -> None:
    """Serve a page to read the AI judge's pairs next to their principles, critique chains as diffs, runs
    and their plots, and to record your own verdicts (keys a / b / t / s, j / k to move) as
    `comparisons` rows. Opens the store per request, so a pipeline can keep running."""
    from cai.review.server import ReviewSetupError, serve
    from cai.review.verdicts import VerdictError

    try:
        serve(db or default_db_path(), port=port, read_only=read_only, reviewer=reviewer,
              announce=lambda line: print(line, flush=True, file=sys.stdout))
    except (ReviewSetupError, VerdictError) as e:
        fail(str(e), code=2)
