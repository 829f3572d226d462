"""`cai constitution history | diff | audit`: versions of a constitution, what changed, and how each
principle fares against people and against the other principles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cai.cli.common import DbOption, _store, console, fail, print_rows
from cai.cli.constitution import constitution_app


@constitution_app.command("history")
def constitution_history(name: Annotated[str | None, typer.Argument(help="Constitution name (default: all).")] = None,
                         db: DbOption = None,
                         as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False
                         ) -> None:
    """Every stored version: hash, first seen, principles added/removed/changed, what it produced."""
    from cai.versions import VersionNotFoundError, history

    store = _store(db)
    if not store.path.exists():
        fail(f"{store.path} does not exist yet")
    try:
        rows = history(store, name)
    except VersionNotFoundError as e:
        fail(str(e))
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    print_rows([{"name": r["name"], "version": r["version"], "hash": r["hash"],
                 "first_seen": f"{r['first_seen']:%Y-%m-%d %H:%M}" if r["first_seen"] else "",
                 "added": ", ".join(r["added"]), "removed": ", ".join(r["removed"]),
                 "changed": ", ".join(r["changed"] + [f"({f})" for f in r["other_changes"]]),
                 "revisions": f"{r['revisions']} ({r['revisions_carried']} carried)",
                 "comparisons": f"{r['comparisons']} ({r['comparisons_carried']} carried)",
                 "models": r["models"]} for r in rows], title="constitution versions")


@constitution_app.command("diff")
def constitution_diff(a: Annotated[str, typer.Argument(help="Old version: a file or a stored hash (prefix).")],
                      b: Annotated[str | None, typer.Argument(help="New version: a file or a stored hash. Default: "
                                                                    "A is a file, compared with the newest stored "
                                                                    "version of the same name.")] = None,
                      db: DbOption = None,
                      as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False
                      ) -> None:
    """Principles added, removed and changed (field by field) between two versions."""
    from cai.versions import VersionNotFoundError, diff_versions, newest_stored, resolve_version
    from cai.yamlio import SpecError

    store = _store(db)
    try:
        old, new = resolve_version(store, a), None
        if b is not None:
            new = resolve_version(store, b)
        else:
            if old.source != "file":
                fail("with one argument, give a constitution file: it is compared with the newest stored version")
            new, old = old, newest_stored(store, old.name, exclude=old.hash)
            if old is None:
                fail(f"no other version of {new.name!r} in {store.path}; give two files or hashes")
    except (VersionNotFoundError, SpecError, FileNotFoundError) as e:
        fail(str(e))
    d = diff_versions(old, new)
    if as_json:
        console.print_json(json.dumps(d.as_dict(), default=str))
        return
    console.print(f"[bold]old[/] {d.old}\n[bold]new[/] {d.new}")
    table = Table(show_lines=True)
    for col in ("principle", "change", "field", "old", "new"):
        table.add_column(col, overflow="fold", max_width=60)
    for pid in d.added:
        table.add_row(pid, "[green]added[/]", "", "", "")
    for pid in d.removed:
        table.add_row(pid, "[red]removed[/]", "", "", "")
    for pid, changes in d.changed.items():
        for c in changes:
            table.add_row(pid, "[yellow]changed[/]", c.field, _text(c.old), _text(c.new))
    for c in d.other:
        table.add_row("(constitution)", "[yellow]changed[/]", c.field, _text(c.old), _text(c.new))
    console.print(table)
    console.print(f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, "
                  f"{len(d.unchanged)} unchanged")


def _text(v) -> str:
    return "" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


@constitution_app.command("audit")
def constitution_audit(file: Annotated[str | None, typer.Argument(help="Constitution file or name (with --against); "
                                                                       "without --against: optional stored hash.")]
                       = None,
                       against: Annotated[Path | None, typer.Option(help="Human-labelled pairs (JSONL: prompt, "
                                                                         "chosen, rejected).")] = None,
                       db: DbOption = None,
                       judge: Annotated[str, typer.Option(help="Judge spec: path or name under judges/.")]
                       = "multiple-choice",
                       model: Annotated[str | None, typer.Option(help="Judge model (default: the spec's).")] = None,
                       engine: Annotated[str | None, typer.Option(help="transformers | vllm | openai.")] = None,
                       limit: Annotated[int | None, typer.Option(help="At most this many pairs (or, without "
                                                                      "--against, comparisons).")] = None,
                       batch_size: Annotated[int, typer.Option(help="Pairs per batched judge call.")] = 16,
                       seed: int = 0,
                       out_dir: Annotated[Path, typer.Option(help="Report and plot folder.")]
                       = Path("data") / "runs" / "audit") -> None:
    """Each principle against people (--against) or against the other principles (the store's labels)."""
    from cai.audit import audit_against, audit_store, store_audit_markdown
    from cai.label import find_constitution, judge_engine, load_spec
    from cai.models import ModelNotFoundError, resolve_in_store
    from cai.yamlio import SpecError

    store = _store(db)
    if against is None:
        if not store.path.exists():
            fail(f"{store.path} does not exist yet")
        chash = None
        if file:
            try:
                chash = find_constitution(file).hash
            except (FileNotFoundError, SpecError):
                chash = file  # a stored hash (prefix)
        try:
            result = audit_store(store, chash, limit=limit)
        except LookupError as e:
            fail(str(e))
        console.print(store_audit_markdown(result))
        return
    if file is None:
        fail("give the constitution to audit: cai constitution audit FILE --against PAIRS.jsonl")
    try:
        constitution = find_constitution(file)
        spec = load_spec(judge)
        model_id, path = resolve_in_store(store, model or spec.model)
        eng = judge_engine(spec, path, engine)
        report = audit_against(store, constitution, against, spec, eng, model_id=model_id, limit=limit,
                               batch_size=batch_size, seed=seed, out_dir=out_dir)
    except (SpecError, FileNotFoundError, ModelNotFoundError, LookupError) as e:
        fail(str(e))
    console.print(report.markdown())
    console.print(f"report: {report.markdown_file}\nplot: {report.plot}\nevaluations rows: {report.evaluation_rows}")
