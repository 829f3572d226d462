"""DPO on the ``preferences`` view, with the judge's soft label put to use.

Direct Preference Optimisation (Rafailov et al., 2023) trains the policy on (prompt, chosen,
rejected) pairs against a frozen reference. With the implicit reward
``h = beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]`` (sums over the
response tokens), the per-pair loss depends on ``label_mode``:

* ``smoothing`` (default): binary cross-entropy against the soft label ``p`` = P(chosen is better),
  ``-p log sigma(h) - (1 - p) log sigma(-h)``. With ``p = 1`` this is plain DPO; with ``p < 1``
  it is conservative DPO with a per-pair smoothing ``1 - p``, and the optimum is calibrated
  (``sigma(h) = p``) instead of pushing the margin to infinity.
* ``weight``: plain DPO loss weighted by the judge's confidence ``2p - 1`` (0 for a coin flip,
  1 for a sure label), normalised by the batch's total weight.
* ``hard``: plain DPO, the label's strength ignored.

Reference log-probabilities are computed once before training (then the reference is freed; with
LoRA the reference is the policy itself with its adapters disabled, so only one model is loaded).
Under `accelerate launch` each process takes its share of every step's pairs and the gradients are
summed (rank 0 alone writes); checkpoints every ``save_every`` steps make a rerun resume.
Pairs whose prompt is in the ``test`` split are held out and evaluated every ``eval_every``
steps. The trained policy is saved as a plain Hugging Face checkpoint and registered in
``models`` like any policy (kind 'policy', parents: the starting policy and the reference).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator, model_validator

from cai.models import DEFAULT_MODEL, register_sources, resolve_in_store
from cai.ppo import Batch, models_root, response_logits, token_logprobs
from cai.store import Store, content_hash
from cai.training import (
    AdapterOptions,
    Dist,
    LoadDtype,
    MetricsBuffer,
    NoMetrics,
    add_lora,
    check_model_id,
    enable_gradient_checkpointing,
    latest_checkpoint,
    load_checkpoint,
    load_dtype_for,
    remove_dropout,
    save_checkpoint,
    sigterm_as_interrupt,
)


class DPOConfig(AdapterOptions):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(DEFAULT_MODEL, description="Starting policy: built-in name, store model id or HF folder.")
    ref: str | None = Field(None, description="Reference (default: the starting policy; with lora, the policy "
                                              "itself with its adapters disabled, not a second copy).")
    model_id: str | None = Field(None, description="Id for the new model (default: dpo-<hash of config and data>).")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint.")
    label_mode: Literal["smoothing", "weight", "hard"] = Field(
        "smoothing", description="How the soft label P(chosen better) enters the loss.")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1, description="Pairs per optimiser step (over all processes).")
    micro_batch_size: int = Field(4, ge=1, description="Pairs per forward pass (gradient accumulation).")
    learning_rate: float | None = Field(None, gt=0, description="Default 1e-6, or 1e-5 with LoRA.")
    max_grad_norm: float = Field(1.0, gt=0)
    max_prompt_tokens: int = Field(256, ge=8, description="Longer prompts keep their last tokens.")
    max_response_tokens: int = Field(256, ge=1, description="Longer responses are cut.")
    min_probability: float = Field(0.5, ge=0.5, le=1, description="Use only pairs at least this sure.")
    judge_name: str | None = Field(None, description="Only labels from this judge.")
    pair_kind: str | None = Field(None, description="Only pairs of this kind (initial_vs_revised, ...).")
    limit: int | None = Field(None, ge=1, description="At most this many training pairs.")
    eval_every: int = Field(10, ge=1, description="Evaluate on held-out pairs every N steps (and at start/end).")
    save_every: int = Field(50, ge=1, description="Steps between checkpoints; the same command resumes from the last.")
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="bfloat16 = autocast forward passes.")
    load_dtype: LoadDtype = Field("auto", description=(
        "Weights' dtype. auto: bfloat16 on a GPU that supports it for the base under LoRA adapters (and a "
        "separate reference with it), float32 for fully trained weights (and their reference) and on CPU."))
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default).")
    num_processes: int = Field(1, ge=1, description="Processes under `accelerate launch` (data parallel; "
                                                    "the run file's stage launches them).")
    output_dir: str | None = None

    @field_validator("model_id")
    @classmethod
    def _safe_model_id(cls, v: str | None) -> str | None:
        return check_model_id(v)

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        return self

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (1e-5 if self.lora else 1e-6)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained weights (how many processes, or how often it checkpoints, don't)."""
        return self.model_dump(exclude={"num_processes", "save_every", "model_id"}) | {"learning_rate": self.lr}


def pair_weights(probability: torch.Tensor, label_mode: str) -> torch.Tensor:
    """How much each pair counts in the mean loss: the judge's confidence ``2p - 1`` in ``weight``
    mode, 1 otherwise. Known before any forward pass, so a step's total weight (the normaliser) is
    the same whether one process or several take the step's pairs."""
    if label_mode == "weight":
        return (2 * probability - 1).clamp(min=0)
    if label_mode in ("smoothing", "hard"):
        return torch.ones_like(probability)
    raise ValueError(f"unknown label_mode {label_mode!r}")


def pair_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, probability: torch.Tensor, beta: float,
                label_mode: str = "smoothing") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO losses (B,) from summed response log-probs, and per-pair statistics (B,)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    if label_mode == "smoothing":
        losses = -probability * F.logsigmoid(h) - (1 - probability) * F.logsigmoid(-h)
    else:  # weight, hard: plain DPO per pair (weight mode weighs it in the mean)
        losses = -F.logsigmoid(h)
    with torch.no_grad():
        stats = {"accuracy": (h > 0).float(), "reward_margin": h,
                 "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
                 "chosen_logp": policy_chosen, "rejected_logp": policy_rejected,
                 "logp_margin": policy_chosen - policy_rejected}
    return losses, stats


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, probability: torch.Tensor, beta: float,
             label_mode: str = "smoothing") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-batch DPO loss from summed response log-probs; ``probability`` = P(chosen is better)."""
    w = pair_weights(probability, label_mode)
    losses, stats = pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, probability, beta,
                                label_mode)
    loss = (w * losses).sum() / w.sum().clamp(min=1e-8)
    return loss, {k: v.mean() for k, v in stats.items()}


def load_pairs(store: Store, cfg: DPOConfig) -> list[dict[str, Any]]:
    where, args = ["pr.probability >= ?"], [cfg.min_probability]
    if cfg.judge_name:
        where.append("pr.judge_name = ?")
        args.append(cfg.judge_name)
    if cfg.pair_kind:
        where.append("pr.pair_kind = ?")
        args.append(cfg.pair_kind)
    rows = store.query(
        "SELECT pr.comparison_id, pr.prompt_id, pr.messages, pr.chosen, pr.rejected, pr.probability, "
        "coalesce(p.split, 'train') AS split FROM preferences pr JOIN prompts p USING (prompt_id) "
        f"WHERE {' AND '.join(where)} ORDER BY pr.comparison_id", args)
    for r in rows:
        r["messages"] = json.loads(r["messages"]) if isinstance(r["messages"], str) else r["messages"]
    return rows


class PairEncoder:
    """Chat-templates and tokenises (prompt, response) so the response is exactly the assistant turn
    (its end-of-turn token included), and assembles left-padded prompt | right-padded response rows."""

    def __init__(self, tokenizer: Any, max_prompt_tokens: int, max_response_tokens: int):
        self.tok, self.max_p, self.max_r = tokenizer, max_prompt_tokens, max_response_tokens
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def encode(self, messages: Sequence[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
        prompt = self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        full = self.tok.apply_chat_template(list(messages) + [{"role": "assistant", "content": response}],
                                            tokenize=False)
        if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to plain suffix
            full = prompt + response + (self.tok.eos_token or "")
        p_ids = self.tok(prompt, add_special_tokens=False)["input_ids"][-self.max_p:]
        r_ids = self.tok(full[len(prompt):], add_special_tokens=False)["input_ids"][:self.max_r]
        return p_ids, r_ids

    def batch(self, items: Sequence[tuple[list[int], list[int]]], device: torch.device) -> Batch:
        P = max(len(p) for p, _ in items)
        T = max(len(r) for _, r in items)
        pad = self.tok.pad_token_id
        ids = torch.full((len(items), P + T), pad, dtype=torch.long)
        attn = torch.zeros((len(items), P + T), dtype=torch.long)
        rmask = torch.zeros((len(items), T))
        for i, (p, r) in enumerate(items):
            ids[i, P - len(p):P] = torch.tensor(p)
            ids[i, P:P + len(r)] = torch.tensor(r)
            attn[i, P - len(p):P + len(r)] = 1
            rmask[i, :len(r)] = 1
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        return Batch(ids, attn, pos, rmask).to(device)


def sequence_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum over response tokens of log p(token | prefix): (B,)."""
    logits = response_logits(model, batch, temperature=1.0)
    return (token_logprobs(logits, batch.responses) * batch.response_mask).sum(1)


def build_policy(path: str, cfg: DPOConfig, device: torch.device) -> torch.nn.Module:
    """The trained policy: weights in ``load_dtype`` (bf16 base under LoRA on a bf16 GPU), optional
    gradient checkpointing and LoRA adapters, no dropout (the reference log-probs it is compared
    with were taken without)."""
    from transformers import AutoModelForCausalLM

    dtype = load_dtype_for(cfg.load_dtype, device, trained=not cfg.lora)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:
        model = add_lora(model, cfg, "CAUSAL_LM")
    # transformers checkpoints activations only in train mode; with dropout gone, that is all train mode does.
    return remove_dropout(model).to(device).train(cfg.gradient_checkpointing)


def run_dpo(store: Store, cfg: DPOConfig, *, progress: bool = True, plot: bool = True,
            stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train a policy with DPO on the store's preferences (or resume it, or find it trained); returns
    a summary. ``stop_after_steps``: checkpoint and return after this many steps (the next call resumes).

    Under `accelerate launch` (``WORLD_SIZE`` > 1) each process takes every world-th pair of a step,
    gradients are summed over the processes before the update, and rank 0 alone writes to the store
    and saves checkpoints and the model."""
    with sigterm_as_interrupt():  # a `kill` marks the run 'interrupted', like Ctrl-C
        return _run_dpo(store, cfg, progress=progress, plot=plot, stop_after_steps=stop_after_steps)


def _run_dpo(store: Store, cfg: DPOConfig, *, progress: bool, plot: bool,
             stop_after_steps: int | None) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    dist = Dist()  # under `accelerate launch`: this process's rank; rank 0 alone writes
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.device_for(cfg.device)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) \
        if cfg.dtype == "bfloat16" else nullcontext
    policy_id, policy_path = resolve_in_store(store, cfg.policy)
    ref_id, ref_path = resolve_in_store(store, cfg.ref) if cfg.ref else (policy_id, policy_path)

    pairs = load_pairs(store, cfg)
    train = [p for p in pairs if p["split"] != "test"][:cfg.limit]
    held_out = [p for p in pairs if p["split"] == "test"]
    pairs = train + held_out  # what `limit` left out is neither encoded nor scored by the reference
    if not train:
        raise LookupError(f"no preference pairs in {store.path} (probability >= {cfg.min_probability}); "
                          "label some comparisons with the judge first")
    data_hash = content_hash(sorted(p["comparison_id"] for p in train))
    config_hash = content_hash("dpo", policy_id, ref_id, cfg.identity())
    model_id = cfg.model_id or f"dpo-{content_hash('dpo', policy_id, ref_id, data_hash, cfg.identity(), length=12)}"
    out_dir = models_root(store, cfg.output_dir) / model_id
    ckpt_dir = out_dir / "checkpoints"
    done = store.query("SELECT path FROM models WHERE model_id = ?", [model_id])
    if done and done[0]["path"] and Path(done[0]["path"]).exists():
        return {"model_id": model_id, "path": done[0]["path"], "already_trained": True}

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    enc = PairEncoder(tokenizer, cfg.max_prompt_tokens, cfg.max_response_tokens)
    for p in pairs:
        p["chosen_ids"] = enc.encode(p["messages"], p["chosen"])
        p["rejected_ids"] = enc.encode(p["messages"], p["rejected"])

    def logps(model: torch.nn.Module, items: list[dict], grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed log-probs; chosen and rejected go through one forward pass."""
        batch = enc.batch([p["chosen_ids"] for p in items] + [p["rejected_ids"] for p in items], device)
        with (nullcontext() if grad else torch.no_grad()), autocast():
            lp = sequence_logprobs(model, batch)
        return lp[:len(items)], lp[len(items):]

    # ---- the policy, and the reference log-probs, once -----------------------------------------
    policy = build_policy(policy_path, cfg, device)
    # With LoRA the reference is the policy with its adapters disabled (= the starting weights): one
    # model in memory, which is what lets a 7B policy train on one device.
    shares_weights = cfg.lora and ref_path == policy_path
    if shares_weights:
        ref, reference = policy, "the policy with its LoRA adapters disabled"
    else:
        # the policy's dtype: a reference rounded differently would give every pair a margin before training
        ref_dtype = load_dtype_for(cfg.load_dtype, device, trained=not cfg.lora)
        ref = remove_dropout(AutoModelForCausalLM.from_pretrained(ref_path, dtype=ref_dtype)).to(device).eval()
        reference = f"a frozen copy of {ref_id}"
    ref_lps = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = list(range(len(pairs)))[dist.rank::dist.world]  # each process scores its share; a sum shares them
    ref_bar = tqdm(total=len(mine), desc="dpo reference log-probs", unit="pair",
                   disable=not progress or not dist.main)
    with policy.disable_adapter() if shares_weights else nullcontext():
        for i in range(0, len(mine), cfg.micro_batch_size):
            idx = mine[i:i + cfg.micro_batch_size]
            rc, rr = logps(ref, [pairs[j] for j in idx])
            ref_lps[idx] = torch.stack([rc, rr], 1).double().cpu()
            ref_bar.update(len(idx))
    ref_bar.close()
    ref_lps = dist.sum_tensor(ref_lps)
    for p, (c, r) in zip(pairs, ref_lps.tolist(), strict=True):
        p["ref_chosen"], p["ref_rejected"] = c, r
    del ref

    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    trainable = [p for p in policy.parameters() if p.requires_grad]

    # The data order: a seeded shuffle per epoch, fixed up front, so a resumed run takes the same steps.
    rng = random.Random(cfg.seed)
    steps: list[list[dict]] = []
    for _epoch in range(cfg.epochs):
        order = list(train)
        rng.shuffle(order)
        steps += [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    total_steps = len(steps)
    ckpt_meta = {"model_id": model_id, "config_hash": config_hash, "train_ids_hash": data_hash,
                 "order_hash": content_hash([[p["comparison_id"] for p in b] for b in steps])}
    step = 0
    ckpt = latest_checkpoint(ckpt_dir)
    if ckpt is not None:
        step = load_checkpoint(ckpt, policy, optimizer, ckpt_meta)["step"]
    start_step = step

    dist.barrier()  # every rank has read the store before rank 0 writes to it
    params = cfg.model_dump() | {"learning_rate": cfg.lr}
    run_id = store.start_run("dpo", {**params, "policy_id": policy_id, "ref_id": ref_id, "model_id": model_id,
                                     "processes": dist.world}) if dist.main else ""
    metrics = MetricsBuffer(store, run_id, model_id) if dist.main else NoMetrics()

    def step_terms(items: list[dict], total_weight: float, grad: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step loss (its weighted losses over the step's total weight)
        and the sums of its per-pair statistics."""
        pc, pr = logps(policy, items, grad=grad)
        t = lambda k: torch.tensor([p[k] for p in items], device=device)  # noqa: E731
        prob = t("probability")
        losses, stats = pair_losses(pc, pr, t("ref_chosen"), t("ref_rejected"), prob, cfg.beta, cfg.label_mode)
        loss = (pair_weights(prob, cfg.label_mode) * losses).sum() / max(total_weight, 1e-8)
        return loss, {k: float(v.detach().sum()) for k, v in stats.items()}

    def weight_of(items: list[dict]) -> float:
        return float(pair_weights(torch.tensor([p["probability"] for p in items]), cfg.label_mode).sum())

    def evaluate(step: int) -> dict[str, float]:
        if not held_out:
            return {}
        total_weight, sums = weight_of(held_out), {}
        with torch.no_grad():
            share = dist.mine(held_out)
            for i in range(0, len(share), cfg.micro_batch_size):
                loss, stats = step_terms(share[i:i + cfg.micro_batch_size], total_weight, grad=False)
                for k, v in {"loss": float(loss), **stats}.items():
                    sums[k] = sums.get(k, 0.0) + v
        sums = dist.sum_values({k: sums.get(k, 0.0) for k in ("loss", *STAT_NAMES)})
        m = {k: v if k == "loss" else v / len(held_out) for k, v in sums.items()}
        metrics.add(step, "test", m)
        metrics.flush()
        return m

    summary: dict[str, Any] = {"run_id": run_id, "model_id": model_id, "train_pairs": len(train),
                               "held_out_pairs": len(held_out), "steps": total_steps, "label_mode": cfg.label_mode,
                               "reference": reference, "processes": dist.world}
    if start_step:
        summary["resumed_from_step"] = start_step
    bar = tqdm(total=total_steps, initial=step, desc="dpo", unit="step", disable=not progress or not dist.main)
    try:
        if start_step == 0:
            first = evaluate(0)
            if first:
                summary["eval_loss_start"], summary["eval_accuracy_start"] = first["loss"], first["accuracy"]
        while step < total_steps:
            if stop_after_steps is not None and step - start_step >= stop_after_steps:
                break
            t0 = time.perf_counter()
            batch_items = steps[step]
            total_weight = weight_of(batch_items)
            sums: dict[str, float] = dict.fromkeys(("loss", *STAT_NAMES), 0.0)
            share = dist.mine(batch_items)  # this process's pairs of the step
            for j in range(0, len(share), cfg.micro_batch_size):
                loss, stats = step_terms(share[j:j + cfg.micro_batch_size], total_weight, grad=True)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"DPO step {step}: loss is {loss.item()}")
                loss.backward()
                for k, v in {"loss": float(loss.detach()), **stats}.items():
                    sums[k] += v
            dist.sum_gradients(trainable)  # several processes: the whole step's gradient on each
            sums = dist.sum_values(sums)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            m = {k: v if k == "loss" else v / len(batch_items) for k, v in sums.items()}
            metrics.add(step, "train", {**m, "grad_norm": float(grad_norm),
                                        "step_seconds": time.perf_counter() - t0})
            metrics.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
            bar.update(1)
            if step % cfg.eval_every == 0 and step < total_steps:
                evaluate(step)
            if step % cfg.save_every == 0 and step < total_steps and dist.main:
                save_checkpoint(ckpt_dir, step, policy, optimizer, ckpt_meta, keep=1)
        bar.close()
        if step < total_steps:  # stopped part-way on purpose: leave a checkpoint to resume from
            if dist.main:
                if step > start_step:
                    save_checkpoint(ckpt_dir, step, policy, optimizer, ckpt_meta, keep=1)
                store.finish_run(run_id, "stopped", {**summary, "stopped_at_step": step})
            dist.barrier()
            return summary | {"finished": False, "stopped_at_step": step}
        last = evaluate(step)
        if last:
            summary["eval_loss_end"], summary["eval_accuracy_end"] = last["loss"], last["accuracy"]
    except BaseException as e:
        bar.close()
        if dist.main:
            store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                             {**summary, "failed_at_step": step}, error=str(e))
        raise
    if not dist.main:  # rank 0 saves and registers the model
        dist.barrier()
        return summary | {"finished": True, "rank": dist.rank}

    # ---- the trained policy: a plain Hugging Face folder (LoRA merged), registered ---------------
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    final = policy.merge_and_unload() if cfg.lora else policy
    final.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "cai_dpo.json").write_text(json.dumps({"model_id": model_id, "run_id": run_id,
                                                  "parents": {"policy": policy_id, "ref": ref_id},
                                                  "params": params}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)  # (its checkpoints too: the model supersedes them)
    tmp.rename(out_dir)
    register_sources(store, (policy_id, policy_path), (ref_id, ref_path))
    store.register_model(model_id, "policy", str(out_dir), base_model_id=policy_id, parent_ids=[policy_id, ref_id],
                         params=params,
                         data_snapshot={"train_pairs": len(train), "comparison_ids_hash": data_hash,
                                        "held_out_pairs": len(held_out)}, run_id=run_id)
    summary.update({"path": str(out_dir), "finished": True, "seconds": round(time.time() - started, 1)})
    if plot:
        from cai.plots import plot_training_curves

        summary["plot"] = str(plot_training_curves(
            store, run_id, out_dir / "training_curves.png", title=f"DPO {model_id}",
            metrics=["loss", "accuracy", "reward_margin", "logp_margin", "chosen_logp", "rejected_logp",
                     "grad_norm", "step_seconds"]))
    store.finish_run(run_id, "ok", summary)
    dist.barrier()
    return summary


STAT_NAMES = ("accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
              "logp_margin")
