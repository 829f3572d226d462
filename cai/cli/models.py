"""`cai models pull`, `cai models list`."""

from __future__ import annotations

from typing import Annotated

import typer

from cai.cli.common import DbOption, _store, app, console, fail, print_rows

models_app = typer.Typer(help="Models: pull the embedded default, list what is available.", no_args_is_help=True)
app.add_typer(models_app, name="models")


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
