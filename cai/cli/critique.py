"""SL-CAI: `cai critique`, `cai sft` (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cai.cli.common import (
    ConfigFileOption,
    DbOption,
    EngineOptionOption,
    NumProcessesOption,
    SetOption,
    ShardOption,
    _store,
    _train_config,
    _validation_message,
    app,
    console,
    engine_options,
    fail,
    is_main_process,
    print_rows,
    relaunch_under_accelerate,
)
from cai.store import Store, StoreLockedError


def _print_critique_report(store: Store, constitution_hash: str | None = None) -> None:
    from cai.critique import critique_report

    rows = critique_report(store, constitution_hash)
    if not rows:
        console.print(f"no revisions in {store.path} yet; run `cai critique`")
        return
    print_rows(rows, title="critique rounds per principle (status counts)")
    total = sum(r["rounds"] for r in rows)
    ok = sum(r["ok"] for r in rows)
    console.print(f"{ok} of {total} rounds ok ({ok / total:.0%}); `cai sql \"select status, reason, count(*) "
                  f"from revisions group by all\"` shows why the others were not", soft_wrap=True, markup=False)


@app.command("critique")
def critique(db: DbOption = None,
             constitution: Annotated[str, typer.Option(help="Constitution: path or name under constitutions/.")]
             = "constitutions/harmless.yaml",
             model: Annotated[str, typer.Option(help="Model that critiques and revises: built-in name, store "
                                                     "model id or HF folder.")] = "smollm2-135m-instruct",
             engine: Annotated[str, typer.Option(help="transformers | vllm | openai")] = "transformers",
             base_url: Annotated[str | None, typer.Option(help="Server URL for --engine openai.")] = None,
             engine_option: EngineOptionOption = None,
             shard: ShardOption = None,
             rounds: Annotated[int, typer.Option(help="Critique-revision rounds per generation.")] = 2,
             few_shot: Annotated[int | None, typer.Option(help="Constitution examples placed first "
                                                               "(default: all).")] = None,
             temperature: float = 0.7, top_p: float = 0.95,
             critique_max_tokens: Annotated[int, typer.Option(help="Max new tokens per critique.")] = 128,
             revision_max_tokens: Annotated[int, typer.Option(help="Max new tokens per revision.")] = 256,
             seed: int = 0,
             max_revision_chars: Annotated[int | None, typer.Option(help="Longer revisions are 'too_long'.")]
             = 4000,
             max_growth: Annotated[float | None, typer.Option(help="Revisions more than this many times as long "
                                                                   "as what they revise are 'too_long'.")] = 4.0,
             generation_model: Annotated[str | None, typer.Option(help="Only generations of this model id.")]
             = None,
             split: Annotated[str | None, typer.Option(help="train | test")] = None,
             category: Annotated[str | None, typer.Option(help="Only prompts of this category.")] = None,
             limit: Annotated[int | None, typer.Option(help="At most this many generations.")] = None,
             batch_size: Annotated[int, typer.Option(help="Generations per engine call and per write.")] = 256,
             report: Annotated[bool, typer.Option("--report", help="Only print how the rounds went, per "
                                                                   "principle, and exit.")] = False,
             changed: Annotated[bool, typer.Option("--changed", help="After editing the constitution: redo only the "
                                                   "rounds its edit touched, carry the others over.")] = False) -> None:
    """Critique and revise initial generations by sampled constitution principles (SL-CAI; resumable)."""
    from pydantic import ValidationError

    from cai.critique import CritiqueConfig, run_critique
    from cai.models import ModelNotFoundError
    from cai.yamlio import SpecError

    store = _store(db)
    if report:
        if not store.path.exists():
            fail(f"{store.path} does not exist yet")
        _print_critique_report(store)
        return
    try:
        cfg = CritiqueConfig(constitution=constitution, model=model, engine=engine, rounds=rounds, few_shot=few_shot,
                             temperature=temperature, top_p=top_p, critique_max_tokens=critique_max_tokens,
                             revision_max_tokens=revision_max_tokens, seed=seed,
                             max_revision_chars=max_revision_chars, max_growth=max_growth,
                             generation_model=generation_model, split=split, category=category, limit=limit,
                             batch_size=batch_size, engine_options=engine_options(base_url, engine_option), shard=shard,
                             changed=changed)
    except ValidationError as e:
        fail(_validation_message(e))
    from cai.engines import EngineConfigError

    try:
        summary = run_critique(store, cfg)
    except (ModelNotFoundError, LookupError, StoreLockedError, SpecError, FileNotFoundError,
            EngineConfigError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary, default=str))
    _print_critique_report(store, summary["constitution_hash"])


@app.command("sft")
def sft(db: DbOption = None,
        base_model: Annotated[str | None, typer.Option(help="Policy to fine-tune: built-in name, store model id "
                                                            "or HF folder (default: the embedded model).")] = None,
        model_id: Annotated[str | None, typer.Option(help="Id of the new model (default: sft-<hash>).")] = None,
        output_dir: Annotated[Path | None, typer.Option(help="Model folder (default: <db dir>/models/<id>).")]
        = None,
        constitution: Annotated[str | None, typer.Option(help="Only revisions under this constitution hash.")]
        = None,
        revision_model: Annotated[str | None, typer.Option(help="Only revisions written by this model id.")]
        = None,
        split: Annotated[str | None, typer.Option(help="Prompts of this split (default train; 'all' for all).")]
        = None,
        limit: Annotated[int | None, typer.Option(help="At most this many pairs.")] = None,
        val_fraction: Annotated[float | None, typer.Option(help="Share of prompts for validation.")] = None,
        max_length: Annotated[int | None, typer.Option(help="Tokens per example.")] = None,
        lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-5; 2e-4 with LoRA).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Examples per micro-batch.")] = None,
        grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
        epochs: Annotated[int | None, typer.Option()] = None,
        max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        lora: Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapters (merged at the end) or "
                                                                        "full fine-tuning.")] = None,
        lora_r: Annotated[int | None, typer.Option()] = None,
        gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing")] = None,
        mixed_precision: Annotated[str | None, typer.Option(help="auto | no | bf16")] = None,
        device: Annotated[str | None, typer.Option(help="cuda | cpu (default: cuda if available).")] = None,
        eval_every: Annotated[int | None, typer.Option(help="Steps between validation passes.")] = None,
        save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
        stop_after: Annotated[int | None, typer.Option(help="Checkpoint and stop after this many steps; the "
                                                            "same command resumes.")] = None,
        num_processes: NumProcessesOption = None,
        sets: SetOption = None,
        config: ConfigFileOption = None) -> None:
    """Fine-tune the policy on the SL-CAI pairs (`sl_cai`: prompt, final revision); resumes if interrupted."""
    from cai.models import ModelNotFoundError
    from cai.sft import SFTConfig, run_sft

    # `--split all` means no split filter: the config's None, which a flag (None = not given) can't carry.
    if split == "all":
        split, sets = None, ["split=null", *(sets or [])]
    cfg = _train_config(SFTConfig, dict(
        base_model=base_model, model_id=model_id, output_dir=str(output_dir) if output_dir else None,
        constitution_hash=constitution, revision_model=revision_model, limit=limit, val_fraction=val_fraction,
        max_length=max_length, lr=lr, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
        max_steps=max_steps, seed=seed, lora=lora, lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
        mixed_precision=mixed_precision, device=device, eval_every=eval_every, save_every=save_every,
        split=split), sets, config)
    relaunch_under_accelerate(num_processes)
    try:
        summary = run_sft(_store(db), cfg, stop_after_steps=stop_after)
    except (ModelNotFoundError, LookupError, StoreLockedError, RuntimeError, ValueError) as e:
        fail(str(e))
    if not is_main_process():
        return
    console.print_json(json.dumps(summary, default=str))
    if summary.get("finished") or summary.get("already_trained"):
        console.print(f"sample from it: cai generate --model {summary['model_id']}", markup=False)
