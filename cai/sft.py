"""Stage 3 (SL-CAI): supervised fine-tuning of the policy on its own revised responses.

The whole trainer is in this file and reads top to bottom (nanoGPT style):

1. **data**: rows of the ``sl_cai`` view (prompt messages, final ``ok`` revision), by default of
   ``train`` prompts only (``test`` prompts stay held out for evaluation); filters: constitution,
   reviser model, limit. The snapshot (revision ids hash, counts, constitutions) goes with the model.
2. **encoding**: ``prompt = chat_template(messages, add_generation_prompt=True)`` and
   ``completion = chat_template(messages + [assistant: revision])[len(prompt):]`` are tokenised
   separately and concatenated, exactly the tokens the model sees when it generates; the completion
   ends at the end-of-turn token (``<|im_end|>``) so the model learns to stop. Labels are ``-100`` on
   the prompt: **the loss is on the response tokens only**. Too long: the prompt loses tokens on the
   left, then the response on the right.
3. **split** by prompt (a seeded hash decides), so no prompt is on both sides.
4. **loop**: one optimizer step = ``batch_size * grad_accum`` examples; the loss of a step is the sum
   of the token losses over its response tokens divided by their count (micro-batching changes
   nothing). AdamW, warm-up then cosine, gradient clipping, optional LoRA (``peft``), gradient
   checkpointing, bf16 autocast where supported (optimizer, schedule, data order and
   checkpoints are shared with the reward-model trainer: `cai/training.py`).
5. **checkpoints** every ``save_every`` steps in ``<model folder>/checkpoints/step-NNNNNN``. The model
   id is a hash of the config, base model and data, so running the same command again resumes from
   the last checkpoint and ends with the same weights as an uninterrupted run.
6. **finish**: merge LoRA, save a plain Hugging Face folder (every engine loads it) plus
   ``cai_sft.json``, register it in ``models`` (kind ``policy``, parent = the base model, data
   snapshot, hyper-parameters). ``cai generate --model <id>`` then samples from it.

Metrics go to ``metrics``: split ``train`` (loss, lr, grad_norm, tokens per step), split ``val``
(loss, perplexity).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from cai import training
from cai.models import DEFAULT_MODEL, register_sources, resolve_in_store
from cai.store import Store, content_hash
from cai.training import (
    Dist,
    MetricsBuffer,
    NoMetrics,
    TrainingConfig,
    autocast_for,
    check_same_training,
    clip_gradients,
    data_order,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    make_optimizer,
    model_folder,
    save_checkpoint,
    seed_everything,
    sigterm_as_interrupt,
)

IGNORE = -100
META_FILE = "cai_sft.json"


class SFTConfig(TrainingConfig):
    # --- what to train ---
    base_model: str = Field(DEFAULT_MODEL, description="Policy to fine-tune: built-in name, store model id or folder.")
    model_id: str | None = Field(None, description="Id for the new model (default: sft-<hash of config and data>).")
    # --- data (the sl_cai view) ---
    constitution_hash: str | None = Field(None, description="Only revisions under this constitution.")
    revision_model: str | None = Field(None, description="Only revisions written by this model id.")
    split: Literal["train", "test"] | None = Field("train", description="Prompts of this split (None: all).")
    limit: int | None = Field(None, ge=1, description="At most this many pairs (by revision id order).")
    max_length: int = Field(1024, ge=16, description="Tokens per example (prompt loses tokens first).")


# =============================================================================================
# 1. Data
# =============================================================================================
@dataclass(frozen=True)
class Pair:
    revision_id: str
    prompt_id: str
    messages: list[dict[str, str]]
    response: str


def load_sl_pairs(store: Store, cfg: SFTConfig) -> tuple[list[Pair], dict[str, Any]]:
    """The SL-CAI pairs (prompt messages, final revision) and their snapshot."""
    where, args = ["revision IS NOT NULL", "trim(revision) <> ''"], []
    for column, value in (("split", cfg.split), ("constitution_hash", cfg.constitution_hash),
                          ("model_id", cfg.revision_model)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    sql = ("SELECT revision_id, prompt_id, messages, revision, rounds, constitution_hash, model_id FROM sl_cai "
           "WHERE " + " AND ".join(where) + " ORDER BY revision_id")
    if cfg.limit:
        sql += f" LIMIT {int(cfg.limit)}"
    rows = store.query(sql, args)
    pairs = [Pair(r["revision_id"], r["prompt_id"], json.loads(r["messages"]), r["revision"]) for r in rows]
    snapshot = {
        "pairs": len(pairs),
        "revision_ids_hash": content_hash(sorted(p.revision_id for p in pairs)),
        "prompts": len({p.prompt_id for p in pairs}),
        "constitution_hashes": sorted({r["constitution_hash"] for r in rows if r["constitution_hash"]}),
        "revision_model_ids": sorted({r["model_id"] for r in rows if r["model_id"]}),
        "rounds": {str(k): sum(r["rounds"] == k for r in rows) for k in sorted({r["rounds"] for r in rows})},
        "filters": {k: getattr(cfg, k) for k in ("split", "constitution_hash", "revision_model", "limit")},
    }
    return pairs, snapshot


def split_by_prompt(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) by prompt: see ``cai.training.split_by_prompt``."""
    return training.split_by_prompt(pairs, val_fraction, seed, salt="sft-split")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens
    truncated: bool

    @property
    def n_target(self) -> int:
        return sum(t != IGNORE for t in self.labels[1:])  # the first token is never predicted


def encode_example(tokenizer, messages: Sequence[dict[str, str]], response: str, max_length: int) -> Example:
    """Prompt tokens (masked) + response tokens (trained on), through the chat template."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with an assistant turn appended; "
                         "cannot tell the response tokens apart")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in c_ids:  # stop at the end-of-turn token; what follows is never generated
        c_ids = c_ids[:len(c_ids) - c_ids[::-1].index(eos)]
    truncated = len(p_ids) + len(c_ids) > max_length
    if truncated:
        keep_prompt = max(max_length - len(c_ids), min(len(p_ids), max_length // 2))
        p_ids = p_ids[-keep_prompt:] if keep_prompt else []
        c_ids = c_ids[:max_length - len(p_ids)]
    return Example(p_ids + c_ids, [IGNORE] * len(p_ids) + c_ids, truncated)


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return input_ids, mask, labels


# =============================================================================================
# 2. The loss
# =============================================================================================
def response_nll(model, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of -log p(token) over the response tokens, how many there are)."""
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


# =============================================================================================
# 3. Model
# =============================================================================================
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(path: str, cfg: SFTConfig, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        training.enable_gradient_checkpointing(model)
    if cfg.lora:
        model = training.add_lora(model, cfg, "CAUSAL_LM")
    return model.to(device)


@torch.no_grad()
def evaluate(model, data: Sequence[Example], cfg: SFTConfig, pad_id: int, device: torch.device,
             autocast) -> dict[str, float]:
    """Mean per-token loss over the response tokens of ``data`` (and its perplexity)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: -len(data[i].input_ids))
    total, count = 0.0, 0
    for start in range(0, len(order), cfg.eval_batch_size):
        input_ids, mask, labels = collate([data[i] for i in order[start:start + cfg.eval_batch_size]], pad_id)
        with autocast():
            nll, n = response_nll(model, input_ids.to(device), mask.to(device), labels.to(device))
        total, count = total + float(nll), count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": float(torch.exp(torch.tensor(min(loss, 50.0))))}


# =============================================================================================
# 4. The stage
# =============================================================================================
def run_sft(store: Store, cfg: SFTConfig, *, progress: bool = True,
            stop_after_steps: int | None = None) -> dict[str, Any]:
    """Fine-tune (or resume, or find already trained) the policy ``cfg`` describes; returns a summary.

    ``stop_after_steps``: checkpoint and return after this many optimizer steps in this call (the
    next call resumes).
    """
    with sigterm_as_interrupt():  # a `kill` marks the run 'interrupted', like Ctrl-C
        return _run_sft(store, cfg, progress=progress, stop_after_steps=stop_after_steps)


def _run_sft(store: Store, cfg: SFTConfig, *, progress: bool, stop_after_steps: int | None) -> dict[str, Any]:
    started = time.time()
    dist = Dist()  # under `accelerate launch`: this process's rank; rank 0 alone writes
    pairs, snapshot = load_sl_pairs(store, cfg)
    if not pairs:
        raise LookupError(f"{store.path} has no SL-CAI pairs (sl_cai rows with an ok revision; filters "
                          f"{snapshot['filters']}); run `cai critique` first")
    train_pairs, val_pairs = split_by_prompt(pairs, cfg.val_fraction, cfg.seed)
    base_id, base_path = resolve_in_store(store, cfg.base_model)
    config_hash = content_hash(cfg.identity(), base_id)
    model_id = cfg.model_id or "sft-" + content_hash("sft", config_hash, snapshot["revision_ids_hash"], length=12)
    out_dir = model_folder(store, cfg, model_id)
    ckpt_dir = out_dir / "checkpoints"
    snapshot |= {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
                 "val_prompt_ids_hash": content_hash(sorted({p.prompt_id for p in val_pairs}))}
    summary: dict[str, Any] = {"model_id": model_id, "path": str(out_dir), "base_model_id": base_id,
                               "pairs": len(pairs), "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}
    params = cfg.model_dump() | {"lr": cfg.peak_lr}
    fingerprint = content_hash("sft", config_hash, snapshot["revision_ids_hash"])
    if (out_dir / META_FILE).exists():  # finished before: make sure it is registered, do nothing else
        meta = json.loads((out_dir / META_FILE).read_text())
        check_same_training(out_dir, meta, fingerprint, "revision_ids_hash", snapshot)
        register_sources(store, (base_id, base_path))
        store.register_model(model_id, "policy", str(out_dir.resolve()), base_model_id=base_id, parent_ids=[base_id],
                             params=meta.get("params"), data_snapshot=meta.get("data_snapshot"))
        return summary | {"already_trained": True, "val": meta.get("val_metrics"),
                          "seconds": round(time.time() - started, 2)}

    dist.barrier()  # every rank has read the store before rank 0 writes to it
    run_id = store.start_run("sft", {**params, "model_id": model_id, "processes": dist.world}) if dist.main else ""
    metrics = MetricsBuffer(store, run_id, model_id) if dist.main else NoMetrics()
    bar = None
    try:
        device = dist.device(cfg)
        autocast = autocast_for(cfg, device)
        seed_everything(cfg.seed)
        tokenizer = load_tokenizer(base_path)
        pad_id = tokenizer.pad_token_id
        train = [encode_example(tokenizer, p.messages, p.response, cfg.max_length) for p in train_pairs]
        val = [encode_example(tokenizer, p.messages, p.response, cfg.max_length) for p in val_pairs]
        summary["truncated"] = sum(e.truncated for e in train + val)
        model = build_model(base_path, cfg, device)
        model.train()
        optimizer = make_optimizer(model, cfg, device)
        per_step = cfg.batch_size * cfg.grad_accum
        stream, total_steps = data_order(len(train), per_step, cfg)
        ckpt_meta = {"model_id": model_id, "config_hash": config_hash, "total_steps": total_steps,
                     "train_ids_hash": content_hash([p.revision_id for p in train_pairs]),
                     "order_hash": content_hash(stream)}

        step = 0
        ckpt = latest_checkpoint(ckpt_dir)
        if ckpt is not None:
            step = load_checkpoint(ckpt, model, optimizer, ckpt_meta)["step"]
            summary["resumed_from_step"] = step
        start_step = step

        trainable = [p for p in model.parameters() if p.requires_grad]
        bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step", disable=not progress or not dist.main)
        tokens_seen, train_seconds, last_val = 0, 0.0, {}
        first_loss = None
        while step < total_steps:
            if stop_after_steps is not None and step - start_step >= stop_after_steps:
                break
            t0 = time.time()
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [train[i] for i in stream[step * per_step:(step + 1) * per_step]]
            n_tokens = max(sum(e.n_target for e in batch), 1)
            loss_sum = 0.0
            mine = dist.mine(batch)
            for m in range(0, len(mine), cfg.batch_size):
                input_ids, mask, labels = collate(mine[m:m + cfg.batch_size], pad_id)
                with autocast():
                    nll, _ = response_nll(model, input_ids.to(device), mask.to(device), labels.to(device))
                # Divide by the step's token count: the gradient is the per-token mean over the whole step.
                (nll / n_tokens).backward()
                loss_sum += float(nll.detach())
            dist.sum_gradients(trainable)  # several processes: the whole step's gradient on each
            loss_sum = dist.sum(loss_sum)
            grad_norm = clip_gradients(trainable, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_seconds += time.time() - t0
            tokens_seen += n_tokens
            loss = loss_sum / n_tokens
            first_loss = loss if first_loss is None else first_loss
            metrics.add(step, "train", {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": n_tokens})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{last_val['loss']:.3f}"} if last_val else {}))
            if val and step % cfg.eval_every == 0 and step < total_steps:
                last_val = evaluate(model, val, cfg, pad_id, device, autocast)
                metrics.add(step, "val", last_val)
            if step % cfg.save_every == 0 and step < total_steps:
                metrics.flush()
                if dist.main:
                    save_checkpoint(ckpt_dir, step, model, optimizer, ckpt_meta, cfg.keep_checkpoints)
            elif step % cfg.log_every == 0:
                metrics.flush()
        bar.close()
        summary |= {"steps": step, "total_steps": total_steps, "train_seconds": round(train_seconds, 2),
                    "tokens_per_second": round(tokens_seen / train_seconds, 1) if train_seconds else None,
                    "first_loss": round(first_loss, 4) if first_loss is not None else None,
                    "last_loss": round(loss, 4) if step > start_step else None}

        if step < total_steps:  # stopped part-way on purpose: leave a checkpoint to resume from
            metrics.flush()
            if step > start_step and dist.main:
                save_checkpoint(ckpt_dir, step, model, optimizer, ckpt_meta, cfg.keep_checkpoints)
            summary["finished"] = False
            if dist.main:
                store.finish_run(run_id, "stopped", summary)
            dist.barrier()
            return summary | {"run_id": run_id, "seconds": round(time.time() - started, 2)}

        val_metrics = evaluate(model, val, cfg, pad_id, device, autocast) if val else {}
        if val_metrics:
            metrics.add(step, "val", val_metrics)
        metrics.flush()
        if not dist.main:  # rank 0 saves and registers the model
            dist.barrier()
            return summary | {"run_id": run_id, "rank": dist.rank}
        if cfg.lora:
            model = model.merge_and_unload()
        model.config.pad_token_id = pad_id
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        params |= {"total_steps": total_steps}
        (out_dir / META_FILE).write_text(json.dumps({
            "format": "cai-sft/1", "model_id": model_id, "base_model": base_id, "params": params,
            "fingerprint": fingerprint,
            "data_snapshot": snapshot, "val_metrics": val_metrics}, indent=2, default=str))
        register_sources(store, (base_id, base_path))
        store.register_model(model_id, "policy", str(out_dir.resolve()), base_model_id=base_id, parent_ids=[base_id],
                             params=params, data_snapshot=snapshot, run_id=run_id)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        summary |= {"finished": True, "val": {k: round(v, 4) for k, v in val_metrics.items()},
                    "seconds": round(time.time() - started, 2)}
        store.finish_run(run_id, "ok", summary)
        dist.barrier()
        return summary | {"run_id": run_id}
    except BaseException as e:
        if bar is not None:
            bar.close()
        try:
            metrics.flush()
        finally:
            if dist.main:
                store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                                 summary, error=repr(e))
        raise
