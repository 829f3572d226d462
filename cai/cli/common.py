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



# ---- scale-out options shared by the engine-taking commands (issue 14) ------------------------------
ShardOption = Annotated[str | None, typer.Option(
    "--shard", help="I/N: only shard I of N (0-based), partitioned by content hash; the union of all N "
                    "shards is exactly one unsharded run.")]
EngineOptionOption = Annotated[list[str] | None, typer.Option(
    "--engine-option", help="Engine option KEY=VALUE (YAML value), repeatable: tensor_parallel_size=2, "
                            "gpu_memory_utilization=0.8, quantization=awq, max_model_len=4096.")]


def engine_options(base_url: str | None = None, items: list[str] | None = None) -> dict:
    """``--base-url`` and ``--engine-option KEY=VALUE`` pairs as an engine's options (values parsed as YAML)."""
    import yaml

    out: dict = {"base_url": base_url} if base_url else {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--engine-option {item!r}: write KEY=VALUE, e.g. --engine-option gpu_memory_utilization=0.8")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


NumProcessesOption = Annotated[int | None, typer.Option(
    "--num-processes", help="Train on N processes under `accelerate launch` (DDP; gloo on CPU, NCCL on "
                            "GPUs, one per GPU); rank 0 alone writes to the store and saves checkpoints.")]


def relaunch_under_accelerate(num_processes: int | None) -> None:
    """Run this very command again under ``accelerate launch`` on ``num_processes`` processes, and
    exit with its status (not when already launched, or for one process)."""
    import os
    import subprocess

    from cai.training import accelerate_command

    if not num_processes or num_processes <= 1 or os.environ.get("WORLD_SIZE"):
        return
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            argv.append(a)
    raise typer.Exit(subprocess.call(accelerate_command(num_processes, argv)))


def is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


LoraOption = Annotated[bool | None, typer.Option("--lora/--full", help=(
    "LoRA adapters (merged into the saved model; the reference is the policy with them disabled) or "
    "full fine-tuning."))]
GradientCheckpointingOption = Annotated[bool | None, typer.Option(
    "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in the backward pass.")]
LoadDtypeOption = Annotated[str | None, typer.Option(
    help="Weights' dtype: auto (bfloat16 on a bf16 GPU for frozen/LoRA-base weights, float32 otherwise) | "
         "float32 | bfloat16.")]
