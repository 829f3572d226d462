"""`cai constitution lint`, `cai constitution schema`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cai.cli.common import app, console, err, fail

constitution_app = typer.Typer(help="Constitution files: lint, JSON Schema, versions, diffs, audits.", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")


@constitution_app.command("lint")
def constitution_lint(files: Annotated[list[Path], typer.Argument(help="Constitution YAML files.")]) -> None:
    """Report every problem in constitution files as file:line: field: message."""
    from cai.constitution import lint

    for f in files:
        if f.is_dir():
            fail(f"{f} is a directory; give the constitution files, e.g. {f}/*.yaml")
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
