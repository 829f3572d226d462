"""Stage 4: train a reward model on the judge's soft preference labels (Bradley-Terry).

The whole trainer is in this file and reads top to bottom:

1. **data**: ``comparisons`` rows with ``status = 'ok'`` joined to their prompts; each is a pair
   (response a, response b) with the judge's soft label ``p_a = P(a is better)``. ``sources`` picks
   whose labels: the AI judge's (``ai``, the default), people's (``human``: every ``human:<source>``
   imported with ``cai ingest-preferences``; or one ``human:<source>``), or a weighted mix; each
   pair's loss is multiplied by its source's weight (weights rescaled to mean 1 over the pairs).
   Filters: minimum confidence; judge spec, constitution and pair kind (these three describe AI
   labels and apply to them only). The snapshot (ids hash, counts per source, judge and
   constitution hashes) is recorded with the model.
2. **split** by prompt: prompts are ordered by ``hash(seed, prompt_id)`` and the first
   ``val_fraction`` of them are validation, so no prompt is on both sides.
3. **loss**: ``BCE(sigmoid(r_a - r_b), p_a)``, i.e. ``-(p log s(d) + (1-p) log s(-d))``: a 0.55 label
   pulls the gap towards ``logit(0.55) = 0.2``, a 0.95 label towards ``2.94``. Options: hard labels,
   a margin, reward centring (below).
4. **loop** (nanoGPT style): one optimizer step = ``batch_size * grad_accum`` pairs; each micro-batch
   is one forward of ``2 * batch_size`` sequences (all a's, then all b's); the loss of a step is the
   sum over its pairs divided by its pair count, so splitting it into micro-batches changes nothing.
   AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast where supported
   (that plumbing, shared with the SFT trainer, is in `cai/training.py`).
5. **checkpoints** every ``save_every`` steps in ``<model folder>/checkpoints/step-NNNNNN``: trainable
   weights, optimizer, RNG states, step and the data order. The model id is a hash of the config and
   the data, so running the same command again resumes from the last checkpoint and ends with the
   same weights, bit for bit, as a run that was never interrupted.
6. **finish**: evaluate, set ``offset`` = mean raw reward over the validation responses (rewards then
   have mean 0 there), merge LoRA, save a plain HF folder + ``cai_reward.json``, register the model.

Metrics go to ``metrics`` (split ``train``: loss, accuracy, lr, grad_norm per step; split ``val``:
loss, accuracy against the judge's majority, Brier score, ECE, reward mean/std per evaluation).
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
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from cai import training
from cai.models import register_sources, resolve_in_store
from cai.rm import collate, encode, load_sequence_classifier, load_tokenizer, sequence_rewards, write_meta
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

DEFAULT_SOURCES = {"ai": 1.0}


class RewardConfig(TrainingConfig):
    model_id: str | None = Field(None, description="Id for the new model (default: rm-<hash of config and data>).")
    # --- data ---
    judge_spec_hash: str | None = Field(None, description="Only comparisons labelled by this judge spec.")
    constitution_hash: str | None = Field(None, description="Only comparisons under this constitution.")
    pair_kind: str | None = Field(None, description="Only comparisons of this kind (e.g. initial_vs_revised).")
    split: Literal["train", "test"] | None = Field(
        "train", description="Only comparisons of prompts in this split (None: all). The default keeps held-out "
                             "prompts, and the policy evaluations judged on them, out of training.")
    min_confidence: float = Field(0.5, ge=0.5, le=1.0,
                                  description="Drop comparisons whose max(p_a, 1 - p_a) is below this.")
    limit: int | None = Field(None, ge=2, description="At most this many comparisons (by id order).")
    sources: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_SOURCES),
        description="Whose labels, with a loss weight each: 'ai' (the AI judge's comparisons), 'human' (all "
                    "people's labels) or 'human:<source>' (one imported set). Text works too: 'human', "
                    "'ai=1,human:hh_harmless_dev=0.5'.")
    max_length: int = Field(1024, ge=8, description="Tokens per sequence; longer ones lose tokens on the left.")
    train_layers: int | None = Field(
        None, ge=0, description="Train only the score head and the top N transformer blocks (0: the head alone, "
                                "a probe on frozen features; None: every weight). Few pairs, little compute: "
                                "a frozen backbone costs about one forward pass per pair and overfits less.")
    # --- objective ---
    hard_labels: bool = Field(False, description="Train on 1[p_a > 0.5] (ties dropped) instead of p_a.")
    margin: float = Field(0.0, ge=0.0, description="Gap the preferred response must win by, scaled by (2p-1).")
    center_coef: float = Field(0.0, ge=0.0, description="Weight of the centring penalty (r_a + r_b)^2.")
    # --- batch sizes and bookkeeping (a pair is two sequences) ---
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch (one forward of 2x sequences).")
    eval_every: int = Field(100, ge=1, description="Steps between validation passes (and one at the end).")
    eval_batch_size: int = Field(16, ge=1, description="Pairs per validation forward.")
    save_every: int = Field(200, ge=1, description="Steps between checkpoints.")

    @field_validator("sources", mode="before")
    @classmethod
    def _parse_sources(cls, value: Any) -> Any:
        return parse_sources(value) if isinstance(value, str) else value

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("name at least one source: ai, human or human:<source>")
        for key, weight in value.items():
            if key not in ("ai", "human") and not (key.startswith("human:") and len(key) > len("human:")):
                raise ValueError(f"unknown source {key!r}: use ai, human or human:<source> (the judge_name of "
                                 "imported labels, see `select distinct judge_name from human_preferences`)")
            if not weight > 0:
                raise ValueError(f"the weight of {key!r} must be > 0 (leave a source out to drop it)")
        return value

    @model_validator(mode="after")
    def _check_trainable(self) -> RewardConfig:
        if self.train_layers is not None and self.lora:
            raise ValueError("train_layers and lora both choose what trains: set one of them")
        return self

    def identity(self) -> dict[str, Any]:
        # The default selection (AI labels only) keeps the ids models had before sources existed.
        ident = super().identity()
        if self.sources == DEFAULT_SOURCES:
            ident.pop("sources")
        if self.train_layers is None:  # likewise for models trained before train_layers existed
            ident.pop("train_layers")
        return ident


def parse_sources(text: str) -> dict[str, float]:
    """``"human"`` -> ``{"human": 1.0}``; ``"ai=1,human:hh=0.5"`` -> ``{"ai": 1.0, "human:hh": 0.5}``."""
    out: dict[str, float] = {}
    for item in text.split(","):
        key, sep, weight = item.strip().partition("=")
        if not key.strip():
            continue
        try:
            out[key.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"source {item.strip()!r}: the weight after '=' must be a number") from None
    return out


def source_of(method: str | None, judge_name: str | None, sources: dict[str, float]) -> str | None:
    """The ``sources`` key a comparison falls under (the most specific one), or None."""
    if method != "human":
        return "ai" if "ai" in sources else None
    if judge_name in sources:
        return judge_name
    return "human" if "human" in sources else None


# =============================================================================================
# 1. Data
# =============================================================================================
@dataclass(frozen=True)
class Pair:
    comparison_id: str
    prompt_id: str
    messages: list[dict[str, str]]
    response_a: str
    response_b: str
    p_a: float  # the judge's P(response_a is better)
    weight: float = 1.0  # loss weight of the pair's source (mean 1 over the training data)


def load_pairs(store: Store, cfg: RewardConfig) -> tuple[list[Pair], dict[str, Any]]:
    """The training comparisons and their snapshot (what exactly the model was trained on)."""
    where = ["c.status = 'ok'", "c.p_a IS NOT NULL", "c.response_a IS NOT NULL", "c.response_b IS NOT NULL",
             "c.response_a <> c.response_b", "greatest(c.p_a, 1 - c.p_a) >= ?"]
    args: list[Any] = [cfg.min_confidence]
    if cfg.hard_labels:
        where.append("c.p_a <> 0.5")  # a tie has no hard label
    # Whose labels: AI rows (with the AI-label filters) and/or people's rows, by source.
    chosen: list[str] = []
    if "ai" in cfg.sources:
        ai_where = ["c.method IS DISTINCT FROM 'human'"]
        for column in ("judge_spec_hash", "constitution_hash", "pair_kind"):
            if getattr(cfg, column) is not None:
                ai_where.append(f"c.{column} = ?")
                args.append(getattr(cfg, column))
        chosen.append(" AND ".join(ai_where))
    if "human" in cfg.sources:
        chosen.append("c.method = 'human'")
    named = [k for k in cfg.sources if k.startswith("human:")]
    if named and "human" not in cfg.sources:
        chosen.append(f"(c.method = 'human' AND c.judge_name IN ({', '.join('?' for _ in named)}))")
        args += named
    where.append("(" + " OR ".join(f"({c})" for c in chosen) + ")")
    if cfg.split is not None:
        where.append("coalesce(p.split, 'train') = ?")
        args.append(cfg.split)
    sql = ("SELECT c.comparison_id, c.prompt_id, p.messages, c.response_a, c.response_b, c.p_a, "
           "c.judge_spec_hash, c.judge_name, c.judge_model_id, c.constitution_hash, c.pair_kind, c.method "
           "FROM comparisons c JOIN prompts p USING (prompt_id) WHERE " + " AND ".join(where) +
           " ORDER BY c.comparison_id")
    if cfg.limit:
        sql += f" LIMIT {int(cfg.limit)}"
    rows = store.query(sql, args)
    keys = [source_of(r["method"], r["judge_name"], cfg.sources) for r in rows]
    raw_weights = [cfg.sources[k] for k in keys]  # every row matched one key in SQL
    scale = len(raw_weights) / sum(raw_weights) if raw_weights else 1.0
    pairs = [Pair(r["comparison_id"], r["prompt_id"], json.loads(r["messages"]), r["response_a"], r["response_b"],
                  min(max(float(r["p_a"]), 0.0), 1.0), w * scale) for r, w in zip(rows, raw_weights, strict=True)]

    def distinct(col: str) -> list[str]:
        return sorted({r[col] for r in rows if r[col] is not None})

    snapshot = {
        "comparisons": len(pairs),
        "comparison_ids_hash": content_hash(sorted(p.comparison_id for p in pairs)),
        "prompts": len({p.prompt_id for p in pairs}),
        "judge_spec_hashes": distinct("judge_spec_hash"),
        "judge_names": distinct("judge_name"),
        "judge_model_ids": distinct("judge_model_id"),
        "constitution_hashes": distinct("constitution_hash"),
        "pair_kinds": {k: sum(r["pair_kind"] == k for r in rows) for k in distinct("pair_kind")},
        "mean_confidence": round(sum(max(p.p_a, 1 - p.p_a) for p in pairs) / max(len(pairs), 1), 4),
        # Whose labels, how many of each, and the loss weight they were given (as configured).
        "sources": {k: {"weight": w, "comparisons": keys.count(k)} for k, w in cfg.sources.items()},
        "human_sources": {j: sum(1 for r in rows if r["method"] == "human" and r["judge_name"] == j)
                          for j in distinct("judge_name") if j.startswith("human:")},
        "filters": {k: getattr(cfg, k) for k in ("judge_spec_hash", "constitution_hash", "pair_kind", "split",
                                                 "min_confidence", "limit", "hard_labels", "sources")},
    }
    return pairs, snapshot


def split_by_prompt(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) by prompt: see ``cai.training.split_by_prompt``."""
    return training.split_by_prompt(pairs, val_fraction, seed, salt="rm-split")


@dataclass
class Encoded:
    """Pairs as token ids, tokenised once: ``ids_a[i]``, ``ids_b[i]`` and label ``p_a[i]``."""

    comparison_ids: list[str]
    ids_a: list[list[int]]
    ids_b: list[list[int]]
    p_a: torch.Tensor  # float32 (N,)
    truncated: int
    weights: torch.Tensor | None = None  # float32 (N,) loss weights; None: all 1

    def __len__(self) -> int:
        return len(self.comparison_ids)


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_length: int) -> Encoded:
    prompts = [p.messages for p in pairs]
    ids, truncated = encode(tokenizer, prompts * 2, [p.response_a for p in pairs] + [p.response_b for p in pairs],
                            max_length=max_length)
    n = len(pairs)
    weights = [p.weight for p in pairs]
    return Encoded([p.comparison_id for p in pairs], ids[:n], ids[n:],
                   torch.tensor([p.p_a for p in pairs], dtype=torch.float32), truncated,
                   None if all(w == 1.0 for w in weights) else torch.tensor(weights, dtype=torch.float32))


def micro_batch(data: Encoded, indices: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``/``attention_mask`` of ``2 * len(indices)`` sequences (a's then b's) and the labels."""
    input_ids, mask = collate([data.ids_a[i] for i in indices] + [data.ids_b[i] for i in indices], pad_id)
    return input_ids, mask, data.p_a[list(indices)]


# =============================================================================================
# 2. The loss
# =============================================================================================
def preference_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor, *, hard_labels: bool = False,
                    margin: float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry loss on soft labels (shape of ``p_a``; sum or average it yourself).

    ``d = r_a - r_b``; the model's ``P(a better) = sigmoid(d)``;
    ``loss = -(t * log sigmoid(z) + (1 - t) * log sigmoid(-z)) + center_coef * (r_a + r_b)^2``
    with ``t = p_a`` (or ``1[p_a > 0.5]`` with ``hard_labels``) and ``z = d - margin * (2t - 1)``:
    the margin moves the target gap further in the preferred direction, by the full margin for a
    certain label and not at all for a tie (with hard labels this is Llama 2's margin loss). The
    centring term (Eisenstein et al. 2023, TRL's ``center_rewards_coefficient``) keeps rewards near 0.
    """
    target = (p_a > 0.5).to(r_a.dtype) if hard_labels else p_a.to(r_a.dtype)
    z = (r_a - r_b) - margin * (2 * target - 1)
    loss = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    if center_coef:
        loss = loss + center_coef * (r_a + r_b) ** 2
    return loss


def agreement(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> tuple[float, int]:
    """(pairs where the model's preferred response is the judge's majority pick, pairs that have one)."""
    decided = p_a != 0.5
    right = ((r_a > r_b) == (p_a > 0.5)) & decided
    return float(right.sum()), int(decided.sum())


def calibration(prob_a: torch.Tensor, p_a: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """Brier score against the soft labels and expected calibration error (ECE) against the judge's
    majority: the model's confidence ``max(q, 1 - q)`` in its pick, binned on [0.5, 1], vs how often
    the pick agrees with the judge."""
    brier = float(((prob_a - p_a) ** 2).mean())
    decided = p_a != 0.5
    q, p = prob_a[decided], p_a[decided]
    if len(q) == 0:
        return {"brier": brier, "ece": float("nan")}
    confidence = torch.maximum(q, 1 - q)
    correct = ((q > 0.5) == (p > 0.5)).float()
    which = ((confidence - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += float(in_bin.float().mean()) * abs(float(correct[in_bin].mean()) - float(confidence[in_bin].mean()))
    return {"brier": brier, "ece": ece}


# =============================================================================================
# 3. Model (optimizer, schedule, checkpoints: cai/training.py)
# =============================================================================================
def build_model(path: str, tokenizer, cfg: RewardConfig, device: torch.device):
    """The sequence classifier (a new score head comes from torch's RNG: seed before), LoRA-wrapped if asked."""
    model = load_sequence_classifier(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        training.enable_gradient_checkpointing(model)
    if cfg.lora:
        # SEQ_CLS keeps the score head fully trainable (modules_to_save) next to the adapters.
        model = training.add_lora(model, cfg, "SEQ_CLS")
    if cfg.train_layers is not None:
        freeze_below_top(model, cfg.train_layers)
    return model.to(device)


def freeze_below_top(model, train_layers: int) -> None:
    """Freeze every weight except the score head, and the last ``train_layers`` blocks with the final norm.
    Frozen weights need no gradients, so autograd keeps no activations for them either."""
    backbone = getattr(model, model.base_model_prefix, None)
    blocks = getattr(backbone, "layers", None)
    if blocks is None or not hasattr(model, "score"):
        raise ValueError(f"train_layers: {type(model).__name__} has no .{model.base_model_prefix}.layers / .score; "
                         "leave train_layers unset to train every weight")
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = [model.score] + ([*blocks[len(blocks) - train_layers:], backbone.norm] if train_layers else [])
    for module in trainable:
        for param in module.parameters():
            param.requires_grad_(True)


# =============================================================================================
# 4. Evaluation
# =============================================================================================
@torch.no_grad()
def evaluate(model, data: Encoded, cfg: RewardConfig, pad_id: int, device: torch.device,
             autocast) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Validation metrics and the raw rewards (r_a, r_b) of every pair, in batches sorted by length."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: -max(len(data.ids_a[i]), len(data.ids_b[i])))
    r_a, r_b = torch.zeros(len(data)), torch.zeros(len(data))
    for start in range(0, len(order), cfg.eval_batch_size):
        idx = order[start:start + cfg.eval_batch_size]
        input_ids, mask, _ = micro_batch(data, idx, pad_id)
        with autocast():
            rewards = sequence_rewards(model, input_ids.to(device), mask.to(device)).cpu()
        r_a[idx], r_b[idx] = rewards[:len(idx)], rewards[len(idx):]
    model.train(was_training)
    loss = preference_loss(r_a, r_b, data.p_a, hard_labels=cfg.hard_labels, margin=cfg.margin,
                           center_coef=cfg.center_coef)
    right, decided = agreement(r_a, r_b, data.p_a)
    both = torch.cat([r_a, r_b])
    metrics = {"loss": float(loss.mean()), "accuracy": right / decided if decided else float("nan"),
               **calibration(torch.sigmoid(r_a - r_b), data.p_a),
               "reward_mean": float(both.mean()), "reward_std": float(both.std()) if len(both) > 1 else 0.0}
    return metrics, r_a, r_b


# =============================================================================================
# 5. The stage
# =============================================================================================
def train_reward(store: Store, cfg: RewardConfig, *, progress: bool = True,
                 stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume, or find already trained) the reward model ``cfg`` describes; returns a summary.

    ``stop_after_steps``: checkpoint and return after this many optimizer steps in this call (for
    time-limited jobs; the next call resumes). An interrupted run resumes from its last checkpoint.
    """
    with sigterm_as_interrupt():
        return _train_reward(store, cfg, progress=progress, stop_after_steps=stop_after_steps)


def _train_reward(store: Store, cfg: RewardConfig, *, progress: bool, stop_after_steps: int | None) -> dict[str, Any]:
    started = time.time()
    dist = Dist()  # under `accelerate launch`: this process's rank; rank 0 alone writes
    # ---- data ----
    pairs, snapshot = load_pairs(store, cfg)
    if len(pairs) < 2:
        hint = ("import people's labels with `cai ingest-preferences FILE`" if "ai" not in cfg.sources
                else "label some pairs with the judge first")
        raise LookupError(f"{store.path} has {len(pairs)} usable comparisons (status 'ok', p_a set, filters: "
                          f"{snapshot['filters']}); {hint}")
    train_pairs, val_pairs = split_by_prompt(pairs, cfg.val_fraction, cfg.seed)
    base_id, base_path = resolve_in_store(store, cfg.base_model)
    config_hash = content_hash(cfg.identity(), base_id)
    model_id = cfg.model_id or "rm-" + content_hash("reward", config_hash, snapshot["comparison_ids_hash"], length=12)
    out_dir = model_folder(store, cfg, model_id)
    ckpt_dir = out_dir / "checkpoints"
    snapshot |= {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
                 "train_prompts": len({p.prompt_id for p in train_pairs}),
                 "val_prompts": len({p.prompt_id for p in val_pairs}),
                 "val_prompt_ids_hash": content_hash(sorted({p.prompt_id for p in val_pairs}))}
    summary: dict[str, Any] = {"model_id": model_id, "path": str(out_dir), "base_model_id": base_id,
                               "pairs": len(pairs), "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}
    fingerprint = content_hash("reward", config_hash, snapshot["comparison_ids_hash"])
    if (out_dir / "cai_reward.json").exists():  # finished before: make sure it is registered, do nothing else
        meta = json.loads((out_dir / "cai_reward.json").read_text())
        check_same_training(out_dir, meta, fingerprint, "comparison_ids_hash", snapshot)
        register_sources(store, (base_id, base_path))
        store.register_model(model_id, "reward", str(out_dir.resolve()), base_model_id=base_id, parent_ids=[base_id],
                             params=meta.get("params"), data_snapshot=meta.get("data_snapshot"))
        return summary | {"already_trained": True, "offset": meta.get("offset"),
                          "val": meta.get("val_metrics"), "seconds": round(time.time() - started, 2)}

    dist.barrier()  # every rank has read the store before rank 0 writes to it
    run_id = (store.start_run("train_rm", {**cfg.model_dump(), "model_id": model_id, "lr": cfg.peak_lr,
                                           "processes": dist.world}) if dist.main else "")
    metrics = MetricsBuffer(store, run_id, model_id) if dist.main else NoMetrics()
    bar = None
    try:
        # ---- model and data on the device ----
        device = dist.device(cfg)
        autocast = autocast_for(cfg, device)
        seed_everything(cfg.seed)
        tokenizer = load_tokenizer(base_path)
        model = build_model(base_path, tokenizer, cfg, device)
        model.train()
        pad_id = tokenizer.pad_token_id
        train, val = encode_pairs(tokenizer, train_pairs, cfg.max_length), encode_pairs(tokenizer, val_pairs, cfg.max_length)
        summary["truncated_sequences"] = train.truncated + val.truncated
        optimizer = make_optimizer(model, cfg, device)
        pairs_per_step = cfg.batch_size * cfg.grad_accum
        stream, total_steps = data_order(len(train), pairs_per_step, cfg)
        ckpt_meta = {"model_id": model_id, "config_hash": config_hash, "total_steps": total_steps,
                     "train_ids_hash": content_hash(train.comparison_ids), "order_hash": content_hash(stream)}

        # ---- resume ----
        step = 0
        ckpt = latest_checkpoint(ckpt_dir)
        if ckpt is not None:
            step = load_checkpoint(ckpt, model, optimizer, ckpt_meta)["step"]
            summary["resumed_from_step"] = step
        start_step = step

        # ---- the loop ----
        trainable = [p for p in model.parameters() if p.requires_grad]
        bar = tqdm(total=total_steps, initial=step, desc="train-rm", unit="step",
                   disable=not progress or not dist.main)
        pairs_seen, train_seconds, last_val = 0, 0.0, {}
        loop_started = time.time()
        while step < total_steps:
            if stop_after_steps is not None and step - start_step >= stop_after_steps:
                break
            t0 = time.time()
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_indices = stream[step * pairs_per_step:(step + 1) * pairs_per_step]
            n_step = len(step_indices)
            loss_sum, right, decided = 0.0, 0.0, 0
            mine = dist.mine(step_indices)
            for m in range(0, len(mine), cfg.batch_size):
                chunk = mine[m:m + cfg.batch_size]
                input_ids, mask, p_a = micro_batch(train, chunk, pad_id)
                input_ids, mask, p_a = input_ids.to(device), mask.to(device), p_a.to(device)
                with autocast():
                    rewards = sequence_rewards(model, input_ids, mask)
                r_a, r_b = rewards.chunk(2)
                per_pair = preference_loss(r_a, r_b, p_a, hard_labels=cfg.hard_labels, margin=cfg.margin,
                                           center_coef=cfg.center_coef)
                if train.weights is not None:  # a weighted mix of sources
                    per_pair = per_pair * train.weights[list(chunk)].to(device)
                # Sum over the micro-batch / pairs in the whole step: the step's gradient is the mean
                # over its pairs however they are split into micro-batches.
                (per_pair.sum() / n_step).backward()
                loss_sum += float(per_pair.detach().sum())
                ok, n = agreement(r_a.detach(), r_b.detach(), p_a)
                right, decided = right + ok, decided + n
            dist.sum_gradients(trainable)  # several processes: the whole step's gradient on each
            loss_sum, right, decided = dist.sum(loss_sum), dist.sum(right), int(dist.sum(decided))
            grad_norm = clip_gradients(trainable, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_seconds += time.time() - t0
            pairs_seen += n_step
            train_metrics = {"loss": loss_sum / n_step, "accuracy": right / decided if decided else float("nan"),
                             "lr": lr, "grad_norm": float(grad_norm)}
            metrics.add(step, "train", train_metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{train_metrics['loss']:.3f}", **({"val_acc": f"{last_val['accuracy']:.3f}"}
                                                                     if last_val else {}))
            if len(val) and step % cfg.eval_every == 0 and step < total_steps:
                last_val, _, _ = evaluate(model, val, cfg, pad_id, device, autocast)
                metrics.add(step, "val", last_val)
            if step % cfg.save_every == 0 and step < total_steps:
                metrics.flush()
                if dist.main:
                    save_checkpoint(ckpt_dir, step, model, optimizer, ckpt_meta, cfg.keep_checkpoints)
            elif step % cfg.log_every == 0:
                metrics.flush()
        bar.close()
        # train_seconds: forward/backward/optimizer only; loop_seconds: the whole loop (metrics, evals, checkpoints).
        loop_seconds = time.time() - loop_started
        summary |= {"steps": step, "total_steps": total_steps, "pairs_trained": pairs_seen,
                    "train_seconds": round(train_seconds, 2), "loop_seconds": round(loop_seconds, 2),
                    "pairs_per_second": round(pairs_seen / loop_seconds, 2) if pairs_seen else None}

        if step < total_steps:  # stopped part-way on purpose: leave a checkpoint to resume from
            metrics.flush()
            if step > start_step and dist.main:
                save_checkpoint(ckpt_dir, step, model, optimizer, ckpt_meta, cfg.keep_checkpoints)
            summary["finished"] = False
            if dist.main:
                store.finish_run(run_id, "stopped", summary)
            dist.barrier()
            return summary | {"run_id": run_id, "seconds": round(time.time() - started, 2)}

        # ---- finish: evaluate, centre, save, register ----
        if len(val):
            val_metrics, r_a, r_b = evaluate(model, val, cfg, pad_id, device, autocast)
            metrics.add(step, "val", val_metrics)
        else:  # no validation set: centre on the training pairs
            val_metrics, r_a, r_b = evaluate(model, train, cfg, pad_id, device, autocast)
            val_metrics = {}
        offset = float(torch.cat([r_a, r_b]).mean())
        metrics.add(step, "val", {"offset": offset})
        metrics.flush()
        if not dist.main:  # rank 0 saves and registers the model
            dist.barrier()
            return summary | {"run_id": run_id, "rank": dist.rank}
        if cfg.lora:
            model = model.merge_and_unload()
        model.config.pad_token_id = pad_id
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        # Exactly which comparisons were trained and validated on (the snapshot holds only their hash).
        (out_dir / "training_data.json").write_text(json.dumps(
            {"train_comparison_ids": train.comparison_ids, "val_comparison_ids": val.comparison_ids}))
        params = cfg.model_dump() | {"lr": cfg.peak_lr, "total_steps": total_steps, "offset": offset}
        write_meta(out_dir, {"model_id": model_id, "fingerprint": fingerprint, "offset": offset, "base_model": base_id, "chat_template": True,
                             "max_length": cfg.max_length, "truncation": "left", "pooling": "last_token",
                             "params": params, "data_snapshot": snapshot, "val_metrics": val_metrics})
        register_sources(store, (base_id, base_path))
        store.register_model(model_id, "reward", str(out_dir.resolve()), base_model_id=base_id, parent_ids=[base_id],
                             params=params, data_snapshot=snapshot, run_id=run_id)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        summary |= {"finished": True, "offset": round(offset, 4),
                    "val": {k: round(v, 4) for k, v in val_metrics.items()}}
        summary["seconds"] = round(time.time() - started, 2)
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
