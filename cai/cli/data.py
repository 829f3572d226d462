"""Prompts and responses: `cai ingest`, `cai generate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cai.cli.common import (
    DbOption,
    EngineOptionOption,
    ShardOption,
    _store,
    app,
    console,
    engine_options,
    err,
    fail,
)
from cai.store import StoreLockedError


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
             engine_option: EngineOptionOption = None,
             shard: ShardOption = None,
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
                             engine_options=engine_options(base_url, engine_option), shard=shard)
    except ValidationError as e:
        fail("; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors()))
    from cai.engines import EngineConfigError

    try:
        summary = run_generate(_store(db), cfg)
    except (ModelNotFoundError, LookupError, StoreLockedError, EngineConfigError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary))
