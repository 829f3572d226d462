"""PPO and DPO (cai/ppo.py, cai/dpo.py): `cai ppo`, `cai dpo`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cai.cli.common import (
    ConfigFileOption,
    DbOption,
    GradientCheckpointingOption,
    LoadDtypeOption,
    LoraOption,
    NumProcessesOption,
    SetOption,
    _store,
    _train_config,
    app,
    console,
    err,
    fail,
    is_main_process,
    relaunch_under_accelerate,
)
from cai.store import StoreLockedError


@app.command("ppo")
def ppo(db: DbOption = None,
        policy: Annotated[str | None, typer.Option(help="Starting policy (built-in name, store id, HF folder).")] = None,
        reward: Annotated[str | None, typer.Option(help="Reward model (store id or folder), judge:SPEC, or "
                                                        "python:module:function.")] = None,
        ref: Annotated[str | None, typer.Option(help="Reference policy (default: the starting policy).")] = None,
        value_model: Annotated[str | None, typer.Option(help="Critic start (default: the reward model).")] = None,
        steps: Annotated[int | None, typer.Option(help="PPO steps (one rollout batch each).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Rollouts per step.")] = None,
        samples_per_prompt: Annotated[int | None, typer.Option(help="Responses per prompt in a batch (scores "
                                                                    "compared within the prompt).")] = None,
        minibatch_size: Annotated[int | None, typer.Option(help="Rollouts per gradient step.")] = None,
        ppo_epochs: Annotated[int | None, typer.Option(help="Passes over each rollout batch.")] = None,
        max_new_tokens: Annotated[int | None, typer.Option(help="Response length limit.")] = None,
        temperature: float | None = None,
        learning_rate: float | None = None,
        kl_coef: Annotated[float | None, typer.Option(help="beta of the per-token KL penalty.")] = None,
        target_kl: Annotated[float | None, typer.Option(help="Adaptive KL target (nats); 0 keeps beta fixed.")] = None,
        missing_eos_penalty: Annotated[float | None, typer.Option(help="Penalty for responses without EOS.")] = None,
        limit: Annotated[int | None, typer.Option(help="At most this many training prompts.")] = None,
        engine: Annotated[str | None, typer.Option(help="Rollout engine: transformers | vllm.")] = None,
        device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
        dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 (autocast)")] = None,
        threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
        seed: int | None = None,
        resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of the same setup.")] = True,
        lora: LoraOption = None,
        gradient_checkpointing: GradientCheckpointingOption = None,
        load_dtype: LoadDtypeOption = None,
        stop_after: Annotated[int | None, typer.Option(help="Checkpoint and stop after this many steps; the "
                                                            "same command resumes.")] = None,
        num_processes: NumProcessesOption = None,
        sets: SetOption = None,
        config: ConfigFileOption = None) -> None:
    """Fine-tune a policy with PPO against a reward model (or judge / Python reward)."""
    from cai.models import ModelNotFoundError
    from cai.ppo import PPOConfig, PPOError, run_ppo

    cfg = _train_config(PPOConfig, {
        "policy": policy, "reward": reward, "ref": ref, "value_model": value_model, "steps": steps,
        "batch_size": batch_size, "samples_per_prompt": samples_per_prompt, "minibatch_size": minibatch_size,
        "ppo_epochs": ppo_epochs, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "learning_rate": learning_rate,
        "kl_coef": kl_coef, "missing_eos_penalty": missing_eos_penalty, "limit": limit,
        "rollout_engine": engine, "device": device, "dtype": dtype, "threads": threads, "seed": seed,
        "target_kl": target_kl, "resume": resume, "lora": lora, "gradient_checkpointing": gradient_checkpointing,
        "load_dtype": load_dtype, "num_processes": num_processes}, sets, config)
    relaunch_under_accelerate(num_processes or (cfg.num_processes if cfg.num_processes > 1 else None))
    try:
        summary = run_ppo(_store(db), cfg, stop_after_steps=stop_after)
    except PPOError as e:
        fail(f"training stopped: {e}")
    except (ModelNotFoundError, LookupError, ValueError, NotImplementedError, StoreLockedError) as e:
        fail(str(e))
    if not is_main_process():
        return
    console.print_json(json.dumps(summary, default=str))
    if "eval_reward_gain" in summary:
        err.print(f"held-out reward {summary['eval_reward_start']:.4f} -> {summary['eval_reward_end']:.4f}: "
                  f"paired gain {summary['eval_reward_gain']:+.4f} ± {summary['eval_reward_gain_se']:.4f} "
                  f"(standard error over {summary['eval_reward_gain_prompts']} held-out prompts)", highlight=False)
    if summary.get("plot"):
        err.print(f"training curves: {summary['plot']}\n"
                  f"  cai sql \"select step, split, metric, value from training_curves where run_id = "
                  f"'{summary['run_id']}' and metric in ('reward', 'kl') order by step\"", highlight=False)


@app.command("dpo")
def dpo(db: DbOption = None,
        policy: Annotated[str | None, typer.Option(help="Starting policy (built-in name, store id, HF folder).")] = None,
        ref: Annotated[str | None, typer.Option(help="Reference (default: the starting policy).")] = None,
        beta: float | None = None,
        label_mode: Annotated[str | None, typer.Option(help="smoothing | weight | hard: how the soft label "
                                                            "P(chosen better) enters the loss.")] = None,
        epochs: int | None = None,
        batch_size: Annotated[int | None, typer.Option(help="Pairs per optimiser step.")] = None,
        micro_batch_size: Annotated[int | None, typer.Option(help="Pairs per forward pass.")] = None,
        learning_rate: float | None = None,
        judge: Annotated[str | None, typer.Option(help="Only labels from this judge name.")] = None,
        pair_kind: Annotated[str | None, typer.Option(help="Only pairs of this kind.")] = None,
        limit: Annotated[int | None, typer.Option(help="At most this many training pairs.")] = None,
        device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
        threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
        seed: int | None = None,
        model_id: Annotated[str | None, typer.Option(help="Id for the new model (default: dpo-<hash>).")] = None,
        output_dir: Annotated[str | None, typer.Option(help="Models folder (default: models/ beside the store).")]
        = None,
        lora: LoraOption = None,
        gradient_checkpointing: GradientCheckpointingOption = None,
        load_dtype: LoadDtypeOption = None,
        save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
        stop_after: Annotated[int | None, typer.Option(help="Checkpoint and stop after this many steps; the "
                                                            "same command resumes.")] = None,
        num_processes: NumProcessesOption = None,
        sets: SetOption = None,
        config: ConfigFileOption = None) -> None:
    """Fine-tune a policy with DPO on the `preferences` view (soft labels as smoothing or weights)."""
    from cai.dpo import DPOConfig, run_dpo
    from cai.models import ModelNotFoundError

    cfg = _train_config(DPOConfig, {
        "policy": policy, "ref": ref, "beta": beta, "label_mode": label_mode, "epochs": epochs,
        "batch_size": batch_size, "micro_batch_size": micro_batch_size, "learning_rate": learning_rate,
        "judge_name": judge, "pair_kind": pair_kind, "limit": limit, "device": device, "threads": threads,
        "seed": seed, "model_id": model_id, "output_dir": output_dir, "lora": lora,
        "gradient_checkpointing": gradient_checkpointing, "load_dtype": load_dtype, "save_every": save_every},
        sets, config)
    relaunch_under_accelerate(num_processes or (cfg.num_processes if cfg.num_processes > 1 else None))
    try:
        summary = run_dpo(_store(db), cfg, stop_after_steps=stop_after)
    except FloatingPointError as e:
        fail(f"training stopped: {e}")
    except (ModelNotFoundError, LookupError, ValueError, RuntimeError, StoreLockedError) as e:
        fail(str(e))
    if not is_main_process():
        return
    console.print_json(json.dumps(summary, default=str))
