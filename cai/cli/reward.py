"""Reward models: `cai train-rm`, `cai rm score`, `cai rm eval` (issue 5)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cai.cli.common import (
    ConfigFileOption,
    DbOption,
    NumProcessesOption,
    SetOption,
    ShardOption,
    _store,
    _train_config,
    app,
    console,
    err,
    fail,
    is_main_process,
    print_rows,
    relaunch_under_accelerate,
)
from cai.store import StoreLockedError

rm_app = typer.Typer(help="Reward models: score (prompt, response) rows, evaluate on human-labelled pairs.",
                     no_args_is_help=True)
app.add_typer(rm_app, name="rm")


@app.command("train-rm")
def train_rm(db: DbOption = None,
             base_model: Annotated[str | None, typer.Option(help="Built-in name, store model id or HF folder "
                                                            "(default: the embedded policy model).")] = None,
             model_id: Annotated[str | None, typer.Option(help="Id of the new model (default: rm-<hash>).")] = None,
             output_dir: Annotated[Path | None, typer.Option(help="Model folder (default: <db dir>/models/<id>).")]
             = None,
             judge: Annotated[str | None, typer.Option(help="Only comparisons of this judge spec hash.")] = None,
             constitution: Annotated[str | None, typer.Option(help="Only comparisons under this constitution hash.")]
             = None,
             pair_kind: Annotated[str | None, typer.Option(help="Only comparisons of this pair kind.")] = None,
             min_confidence: Annotated[float | None, typer.Option(help="Drop labels with max(p, 1-p) below this.")]
             = None,
             limit: Annotated[int | None, typer.Option(help="At most this many comparisons.")] = None,
             sources: Annotated[str | None, typer.Option(
                 help="Whose labels: ai (default: the AI judge's), human (people's, from `cai ingest-preferences`), "
                      "human:NAME, or a weighted mix such as ai=1,human:hh_harmless_dev=0.5.")] = None,
             val_fraction: Annotated[float | None, typer.Option(help="Share of prompts for validation.")] = None,
             max_length: Annotated[int | None, typer.Option(help="Tokens per sequence (left-truncated).")] = None,
             hard_labels: Annotated[bool | None, typer.Option("--hard-labels/--soft-labels",
                                                              help="Train on 1[p>0.5] instead of p.")] = None,
             margin: Annotated[float | None, typer.Option(help="Margin, scaled by the label's confidence.")] = None,
             center_coef: Annotated[float | None, typer.Option(help="Reward-centring penalty weight.")] = None,
             lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-5; 2e-4 with LoRA).")]
             = None,
             batch_size: Annotated[int | None, typer.Option(help="Pairs per micro-batch.")] = None,
             grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
             epochs: Annotated[int | None, typer.Option()] = None,
             max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
             seed: Annotated[int | None, typer.Option()] = None,
             lora: Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapters or full fine-tuning.")]
             = None,
             lora_r: Annotated[int | None, typer.Option()] = None,
             gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing")] = None,
             train_layers: Annotated[int | None, typer.Option(
                 help="Train only the score head and the top N blocks (0: a probe on frozen features).")] = None,
             mixed_precision: Annotated[str | None, typer.Option(help="auto | no | bf16")] = None,
             device: Annotated[str | None, typer.Option(help="cuda | cpu (default: cuda if available).")] = None,
             eval_every: Annotated[int | None, typer.Option(help="Steps between validation passes.")] = None,
             save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
             stop_after: Annotated[int | None, typer.Option(help="Checkpoint and stop after this many steps; "
                                                            "the same command resumes.")] = None,
             num_processes: NumProcessesOption = None,
             sets: SetOption = None,
             config: ConfigFileOption = None) -> None:
    """Train a reward model on the judge's soft labels (or people's: --sources human); resumes if interrupted."""
    from cai.models import ModelNotFoundError
    from cai.reward import RewardConfig, train_reward

    cfg = _train_config(RewardConfig, dict(
        base_model=base_model, model_id=model_id, output_dir=str(output_dir) if output_dir else None,
        judge_spec_hash=judge, constitution_hash=constitution, pair_kind=pair_kind, min_confidence=min_confidence,
        limit=limit, sources=sources, val_fraction=val_fraction, max_length=max_length, hard_labels=hard_labels,
        margin=margin, center_coef=center_coef, lr=lr, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
        max_steps=max_steps, seed=seed, lora=lora, lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
        train_layers=train_layers, mixed_precision=mixed_precision, device=device, eval_every=eval_every,
        save_every=save_every), sets, config)
    relaunch_under_accelerate(num_processes)
    try:
        summary = train_reward(_store(db), cfg, stop_after_steps=stop_after)
    except (ModelNotFoundError, LookupError, StoreLockedError, RuntimeError, ValueError) as e:
        fail(str(e))
    if not is_main_process():
        return
    console.print_json(json.dumps(summary, default=str))


@rm_app.command("score")
def rm_score(model: Annotated[str, typer.Option(help="Reward model: store model id or folder.")],
             file: Annotated[Path | None, typer.Argument(help="JSONL: prompt (or messages) and response, or "
                                                         "chosen/rejected pairs. Without it: rows of the store.")]
             = None,
             db: DbOption = None,
             sql: Annotated[str | None, typer.Option(help="Store query returning messages (or prompt) and "
                                                   "response (default: every generation).")] = None,
             out: Annotated[Path | None, typer.Option(help="Write JSONL with the rewards here.")] = None,
             limit: Annotated[int | None, typer.Option(help="At most this many rows.")] = None,
             batch_size: Annotated[int, typer.Option(help="Sequences per forward.")] = 16,
             raw: Annotated[bool, typer.Option(help="Do not subtract the stored offset.")] = False,
             shard: ShardOption = None) -> None:
    """Score (prompt, response) rows from a file or the store with a reward model."""
    import statistics

    from cai.sharding import parse_shard

    try:
        parse_shard(shard)
    except ValueError as e:
        fail(f"--shard: {e}")

    from cai.models import ModelNotFoundError
    from cai.rm import PairsFileError, RewardModel, score_file, score_store

    store = _store(db)
    try:
        rm = RewardModel.load(model, store=store)
        if raw:
            rm.offset = 0.0
        rows = (score_file(rm, file, limit=limit, batch_size=batch_size, shard=shard) if file
                else score_store(rm, store, sql=sql, limit=limit, batch_size=batch_size, shard=shard))
    except (ModelNotFoundError, PairsFileError, FileNotFoundError, ValueError, StoreLockedError) as e:
        fail(str(e))
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    keys = [k for k in ("reward", "reward_chosen", "reward_rejected") if any(k in r for r in rows)]
    if out:
        out.write_text(text)
        console.print(f"wrote {len(rows)} scored rows to {out}")
    elif not sys.stdout.isatty():
        sys.stdout.write(text)
        return
    else:
        print_rows([{"id": r.get("id"), **{k: round(r[k], 4) if k in r else None for k in keys}} for r in rows[:50]])
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        err.print(f"{k}: n={len(vals)} mean={statistics.fmean(vals):.4f} "
                  f"std={statistics.pstdev(vals):.4f} min={min(vals):.4f} max={max(vals):.4f}")


@rm_app.command("eval")
def rm_eval(file: Annotated[Path, typer.Argument(help="JSONL of human-labelled pairs: prompt, chosen, rejected "
                                                 "(the judge-eval format).")],
            model: Annotated[str, typer.Option(help="Reward model: store model id or folder.")],
            db: DbOption = None,
            limit: Annotated[int | None, typer.Option(help="Only the first N pairs.")] = None,
            batch_size: Annotated[int, typer.Option(help="Sequences per forward.")] = 16,
            by: Annotated[list[str] | None, typer.Option(
                help="Break accuracy down by this field of the file (repeatable; default: the subset-like "
                     "fields it has: subset, source, category, agreement, ...).")] = None) -> None:
    """Accuracy of a reward model on human-labelled pairs (r(chosen) > r(rejected)) with its 95% interval,
    beside the longer-answer baseline and per subset; saved to `evaluations`. JSON on stdout, text on stderr."""
    from cai.models import ModelNotFoundError
    from cai.rm import PairsFileError, evaluate_human_pairs

    try:
        summary = evaluate_human_pairs(_store(db), model, file, limit=limit, batch_size=batch_size, by=by)
    except (ModelNotFoundError, PairsFileError, FileNotFoundError, StoreLockedError) as e:
        fail(str(e))
    console.print_json(json.dumps(summary, default=str))
    err.print(f"reward model {summary['model_id']} on {summary['dataset']} ({summary['pairs']} pairs):",
              markup=False, highlight=False)
    for line in summary["report"]:
        err.print(line, markup=False, highlight=False, soft_wrap=True)
