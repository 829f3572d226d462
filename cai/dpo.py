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

Reference log-probabilities are computed once before training (then the reference is freed).
Pairs whose prompt is in the ``test`` split are held out and evaluated every ``eval_every``
steps. The trained policy is saved as a plain Hugging Face checkpoint and registered in
``models`` like any policy (kind 'policy', parents: the starting policy and the reference).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.models import DEFAULT_MODEL, register_sources, resolve_in_store
from cai.ppo import Batch, models_root, pick_device, response_logits, token_logprobs
from cai.store import Store, content_hash, now
from cai.training import sigterm_as_interrupt


class DPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(DEFAULT_MODEL, description="Starting policy: built-in name, store model id or HF folder.")
    ref: str | None = Field(None, description="Reference (default: the starting policy).")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint.")
    label_mode: Literal["smoothing", "weight", "hard"] = Field(
        "smoothing", description="How the soft label P(chosen better) enters the loss.")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1, description="Pairs per optimiser step.")
    micro_batch_size: int = Field(4, ge=1, description="Pairs per forward pass (gradient accumulation).")
    learning_rate: float = Field(1e-6, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_prompt_tokens: int = Field(256, ge=8, description="Longer prompts keep their last tokens.")
    max_response_tokens: int = Field(256, ge=1, description="Longer responses are cut.")
    min_probability: float = Field(0.5, ge=0.5, le=1, description="Use only pairs at least this sure.")
    judge_name: str | None = Field(None, description="Only labels from this judge.")
    pair_kind: str | None = Field(None, description="Only pairs of this kind (initial_vs_revised, ...).")
    limit: int | None = Field(None, ge=1, description="At most this many training pairs.")
    eval_every: int = Field(10, ge=1, description="Evaluate on held-out pairs every N steps (and at start/end).")
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default).")
    output_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        return self


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, probability: torch.Tensor, beta: float,
             label_mode: str = "smoothing") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-batch DPO loss from summed response log-probs; ``probability`` = P(chosen is better)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    if label_mode == "smoothing":
        losses = -probability * F.logsigmoid(h) - (1 - probability) * F.logsigmoid(-h)
        loss = losses.mean()
    elif label_mode == "weight":
        w = (2 * probability - 1).clamp(min=0)
        loss = (w * -F.logsigmoid(h)).sum() / w.sum().clamp(min=1e-8)
    elif label_mode == "hard":
        loss = -F.logsigmoid(h).mean()
    else:
        raise ValueError(f"unknown label_mode {label_mode!r}")
    with torch.no_grad():
        stats = {"accuracy": (h > 0).float().mean(), "reward_margin": h.mean(),
                 "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
                 "chosen_logp": policy_chosen.mean(), "rejected_logp": policy_rejected.mean(),
                 "logp_margin": (policy_chosen - policy_rejected).mean()}
    return loss, stats


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


def run_dpo(store: Store, cfg: DPOConfig, *, progress: bool = True, plot: bool = True) -> dict[str, Any]:
    """Train a policy with DPO on the store's preferences; returns a summary."""
    with sigterm_as_interrupt():  # a `kill` marks the run 'interrupted', like Ctrl-C
        return _run_dpo(store, cfg, progress=progress, plot=plot)


def _run_dpo(store: Store, cfg: DPOConfig, *, progress: bool, plot: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) \
        if cfg.dtype == "bfloat16" else nullcontext
    policy_id, policy_path = resolve_in_store(store, cfg.policy)
    ref_id, ref_path = resolve_in_store(store, cfg.ref) if cfg.ref else (policy_id, policy_path)

    pairs = load_pairs(store, cfg)
    train = [p for p in pairs if p["split"] != "test"][:cfg.limit]
    held_out = [p for p in pairs if p["split"] == "test"]
    if not train:
        raise LookupError(f"no preference pairs in {store.path} (probability >= {cfg.min_probability}); "
                          "label some comparisons with the judge first")
    data_hash = content_hash(sorted(p["comparison_id"] for p in train))
    model_id = f"dpo-{content_hash('dpo', policy_id, ref_id, data_hash, cfg.model_dump(), length=12)}"
    out_dir = models_root(store, cfg.output_dir) / model_id
    done = store.query("SELECT path FROM models WHERE model_id = ?", [model_id])
    if done and done[0]["path"] and Path(done[0]["path"]).exists():
        return {"model_id": model_id, "path": done[0]["path"], "already_trained": True}

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
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

    # ---- reference log-probs, once -------------------------------------------------------------
    ref = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32).to(device).eval()
    for i in range(0, len(pairs), cfg.micro_batch_size):
        chunk = pairs[i:i + cfg.micro_batch_size]
        rc, rr = logps(ref, chunk)
        for p, c, r in zip(chunk, rc.tolist(), rr.tolist(), strict=True):
            p["ref_chosen"], p["ref_rejected"] = c, r
    del ref

    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).to(device).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0,
                                  fused=device.type in ("cpu", "cuda"))
    run_id = store.start_run("dpo", {**cfg.model_dump(), "policy_id": policy_id, "ref_id": ref_id,
                                     "model_id": model_id})

    def step_loss(items: list[dict], grad: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pc, pr = logps(policy, items, grad=grad)
        t = lambda k: torch.tensor([p[k] for p in items], device=device)  # noqa: E731
        return dpo_loss(pc, pr, t("ref_chosen"), t("ref_rejected"), t("probability"), cfg.beta, cfg.label_mode)

    def evaluate(step: int) -> dict[str, float]:
        if not held_out:
            return {}
        sums: dict[str, float] = {}
        for i in range(0, len(held_out), cfg.micro_batch_size):
            chunk = held_out[i:i + cfg.micro_batch_size]
            loss, stats = step_loss(chunk, grad=False)
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        m = {k: v / len(held_out) for k, v in sums.items()}
        _write_metrics(store, run_id, model_id, step, "test", m)
        return m

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    summary: dict[str, Any] = {"run_id": run_id, "model_id": model_id, "train_pairs": len(train),
                               "held_out_pairs": len(held_out), "steps": total_steps, "label_mode": cfg.label_mode}
    bar = tqdm(total=total_steps, desc="dpo", unit="step", disable=not progress)
    step = 0
    try:
        first = evaluate(0)
        if first:
            summary["eval_loss_start"], summary["eval_accuracy_start"] = first["loss"], first["accuracy"]
        for _epoch in range(cfg.epochs):
            order = list(train)
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                t0 = time.perf_counter()
                batch_items = order[start:start + cfg.batch_size]
                optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                for j in range(0, len(batch_items), cfg.micro_batch_size):
                    micro = batch_items[j:j + cfg.micro_batch_size]
                    loss, stats = step_loss(micro, grad=True)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"DPO step {step}: loss is {loss.item()}")
                    (loss * len(micro) / len(batch_items)).backward()
                    for k, v in {"loss": loss, **stats}.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(micro) / len(batch_items)
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                step += 1
                _write_metrics(store, run_id, model_id, step, "train",
                               {**sums, "grad_norm": float(grad_norm), "step_seconds": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{sums['loss']:.3f}", acc=f"{sums['accuracy']:.2f}")
                bar.update(1)
                if step % cfg.eval_every == 0 and step < total_steps:
                    evaluate(step)
        last = evaluate(step)
        if last:
            summary["eval_loss_end"], summary["eval_accuracy_end"] = last["loss"], last["accuracy"]
    except BaseException as e:
        bar.close()
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                         {**summary, "failed_at_step": step}, error=str(e))
        raise
    bar.close()

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "cai_dpo.json").write_text(json.dumps({"model_id": model_id, "run_id": run_id,
                                                  "parents": {"policy": policy_id, "ref": ref_id},
                                                  "params": cfg.model_dump()}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    register_sources(store, (policy_id, policy_path), (ref_id, ref_path))
    store.register_model(model_id, "policy", str(out_dir), base_model_id=policy_id, parent_ids=[policy_id, ref_id],
                         params=cfg.model_dump(),
                         data_snapshot={"train_pairs": len(train), "comparison_ids_hash": data_hash,
                                        "held_out_pairs": len(held_out)}, run_id=run_id)
    summary.update({"path": str(out_dir), "seconds": round(time.time() - started, 1)})
    if plot:
        from cai.plots import plot_training_curves

        summary["plot"] = str(plot_training_curves(
            store, run_id, out_dir / "training_curves.png", title=f"DPO {model_id}",
            metrics=["loss", "accuracy", "reward_margin", "logp_margin", "chosen_logp", "rejected_logp",
                     "grad_norm", "step_seconds"]))
    store.finish_run(run_id, "ok", summary)
    return summary


def _write_metrics(store: Store, run_id: str, model_id: str, step: int, split: str,
                   metrics: dict[str, float]) -> None:
    stamp = now()
    store.insert("metrics", [{"run_id": run_id, "model_id": model_id, "step": step, "split": split, "name": k,
                              "value": float(v), "created_at": stamp} for k, v in metrics.items()])
