"""People's preference labels: `cai ingest-preferences` (issue 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai.cli.common import DbOption, _store, app, console, fail
from cai.store import StoreLockedError


@app.command("ingest-preferences")
def ingest_preferences(
        files: Annotated[list[Path], typer.Argument(help="JSONL or Parquet files of human-labelled pairs: "
                                                    "prompt/chosen/rejected (text or chat messages), or raw "
                                                    "HH-RLHF chosen/rejected transcripts.")],
        db: DbOption = None,
        source: Annotated[str | None, typer.Option(help="Name the labels 'human:NAME' (default: each file's "
                                                   "stem).")] = None,
        test_fraction: Annotated[float, typer.Option(help="Share of new prompts held out as split 'test'.")]
        = 0.1) -> None:
    """Load people's preference pairs as comparisons judged 'human:<source>' (all files or nothing)."""
    from cai.preferences import PreferenceImportError, import_preferences

    store = _store(db)
    try:
        s = import_preferences(store, list(files), source=source, test_fraction=test_fraction)
    except (PreferenceImportError, StoreLockedError) as e:
        fail(str(e))
    shapes = ", ".join(f"{k} {v}" for k, v in sorted(s.shapes.items()))
    console.print(f"{s.pairs} pairs from {len(s.files)} file(s) as {', '.join(s.judge_names)} ({shapes}): "
                  f"{s.comparisons_new} new comparisons, {s.comparisons_present} already present"
                  + (f", {s.duplicates_in_file} repeated in the files" if s.duplicates_in_file else "")
                  + f"; {s.prompts_new} new prompts", markup=False, highlight=False, soft_wrap=True)
    console.print("read them: cai sql \"select source, split, count(*) from human_preferences group by all\"",
                  markup=False, highlight=False, soft_wrap=True)
