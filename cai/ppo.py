"""PPO for language models, in one file (in the spirit of CleanRL's ``ppo.py``).

The pieces, each named where it happens below:

* **actor** = the policy being trained (a causal LM, optionally with LoRA adapters); **reference** =
  a frozen copy of the starting policy (with LoRA: the actor itself with its adapters disabled, no
  second copy); **critic** = a value head on its own backbone, initialised from the reward
  model by default (``value_model`` names another starting point); **reward** = anything that
  maps (prompt, response) to a number: a frozen reward model, a d-RLAIF judge score, or a
  Python function (one ``Reward`` interface).
* One PPO *step* = one rollout batch:
  1. **rollout**: sample ``batch_size`` responses from the live policy (left-padded, batched
     ``generate``; optionally vLLM with the new weights loaded each step), ``samples_per_prompt``
     of them for each of ``batch_size / samples_per_prompt`` prompts;
  2. **score**: sequence reward from the reward; EOS-missing penalty; with several samples per
     prompt, the leave-one-out group baseline (each score minus the mean of its prompt's other
     responses: the prompt's difficulty cancels, which a young critic cannot do yet); optional
     running normalisation / clipping;
  3. **experience**: log-probs of the sampled tokens under the policy (old) and the reference,
     values from the critic, all from plain forward passes;
  4. **per-token rewards**: ``r_t = -beta * (log pi - log pi_ref)`` at every response token,
     plus the sequence reward at the last token;
  5. **GAE(gamma, lambda)** advantages and returns; advantage whitening;
  6. **optimisation**: ``ppo_epochs`` passes over shuffled minibatches with the clipped
     surrogate, the clipped value loss, gradient clipping;
  7. **KL controller**: fixed beta, or the adaptive controller of Ziegler et al. (2019) aiming
     at ``target_kl``.
* Several processes (`accelerate launch`): each rolls out and trains on its block of the batch;
  whatever mixes rows (normalisation, whitening, minibatch losses, the KL controller) is all-reduced
  so the update is the one-process one (``PPOTrainer.step``).
* Bookkeeping: metrics every step to ``metrics``, sample responses to ``samples`` every
  ``sample_every`` steps, held-out reward every ``eval_every`` steps, checkpoints every
  ``save_every`` steps (resumed automatically), a stop with a clear message on NaN/inf or a KL
  blow-up (the last good checkpoint stays), the final policy saved as a plain Hugging Face
  checkpoint and registered in ``models`` with its parents and hyper-parameters.

Shapes: ``B`` rollouts per batch, ``P`` prompt tokens (left-padded), ``T`` response tokens
(right-padded after EOS). ``mask[b, t]`` is 1 for real response tokens, the EOS included.
Every log-probability is taken at the sampling temperature, so the policy being optimised is
exactly the distribution the rollouts were drawn from.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from cai import runs
from cai.models import DEFAULT_MODEL, register_sources, resolve_in_store
from cai.store import Store, content_hash, now
from cai.training import (
    AdapterOptions,
    Dist,
    LoadDtype,
    add_lora,
    enable_gradient_checkpointing,
    load_dtype_for,
    remove_dropout,
    sigterm_as_interrupt,
    trainable_state,
)

Conversation = list[dict[str, str]]
log = logging.getLogger(__name__)


# =============================================================================================
# Configuration
# =============================================================================================
class PPOConfig(AdapterOptions):
    """Everything that shapes a PPO run. The defaults work for SmolLM2-135M on a CPU. LoRA and gradient
    checkpointing (``AdapterOptions``) apply to the actor and the critic's backbone alike."""

    model_config = ConfigDict(extra="forbid")

    # ---- models ----
    policy: str = Field(DEFAULT_MODEL, description="Starting policy: built-in name, store model id or HF folder.")
    reward: str | None = Field(None, description=(
        "Reward: a reward model (store id or HF folder of an AutoModelForSequenceClassification), "
        "'judge:SPEC' for a d-RLAIF judge score, or 'python:module:function'."))
    ref: str | None = Field(None, description="Reference policy for the KL penalty (default: the starting policy).")
    value_model: str | None = Field(None, description=(
        "Where the critic starts: None = the reward model (or the policy when the reward is not a model), "
        "or any model folder / store id (a fresh value head is added to causal LMs)."))

    # ---- prompts ----
    split: str | None = Field("train", description="Train on prompts of this split.")
    category: str | None = None
    limit: int | None = Field(None, ge=1, description="At most this many training prompts.")
    eval_split: str | None = Field("test", description="Held-out prompts for the eval reward (None: no eval).")
    eval_prompts: int = Field(16, ge=1, description="How many held-out prompts to evaluate on.")
    eval_every: int = Field(10, ge=1, description="Evaluate on held-out prompts every N steps (and at start/end).")
    eval_samples_per_prompt: int = Field(1, ge=1, description=(
        "Responses sampled per held-out prompt: more of them make the held-out reward curve less noisy."))
    max_prompt_tokens: int = Field(256, ge=8, description="Prompts longer than this (templated) are skipped.")

    # ---- rollouts ----
    steps: int = Field(20, ge=1, description="PPO steps (one rollout batch each).")
    batch_size: int = Field(16, ge=2, description="Rollouts per step.")
    samples_per_prompt: int = Field(4, ge=1, description=(
        "Responses sampled per prompt in a rollout batch (batch_size / samples_per_prompt prompts a step)."))
    max_new_tokens: int = Field(48, ge=1, description="Response length limit.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (log-probs are taken at it too).")
    rollout_engine: Literal["transformers", "vllm"] = "transformers"
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description=(
        "rollout_engine vllm: share of the GPU's memory vLLM may claim (weights + KV cache); the rest is "
        "left to the policy, reference, critic and optimizer that train beside it."))
    vllm_sleep_mode: bool = Field(False, description=(
        "rollout_engine vllm: put the engine to sleep (vLLM sleep mode) after each rollout and wake it "
        "before the next, so training gets the GPU memory back. Needs CUDA; elsewhere it is skipped with "
        "a logged note."))
    vllm_sleep_level: Literal[1, 2] = Field(1, description=(
        "1: offload the weights to CPU memory and drop the KV cache; 2: drop the weights too (they are "
        "reloaded from the live policy before every rollout anyway)."))
    generation_batch_size: int | None = Field(None, ge=1, description="Prompts per generate call (default all).")
    forward_batch_size: int = Field(16, ge=1, description="Rows per no-grad forward pass in the experience phase.")

    # ---- objective ----
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the per-token KL penalty (initial value if adaptive).")
    target_kl: float | None = Field(6.0, gt=0, description=(
        "Adaptive KL controller target (nats per response); None keeps beta fixed."))
    kl_horizon: int = Field(10000, ge=1, description="Adaptive controller horizon (rollouts).")
    max_kl: float = Field(50.0, gt=0, description="Stop when the mean KL to the reference exceeds this (blow-up).")
    missing_eos_penalty: float = Field(0.0, ge=0, description="Subtracted from the reward of responses cut off without EOS.")
    group_baseline: bool = Field(True, description=(
        "With samples_per_prompt > 1: subtract from each score the mean score of the other responses to the "
        "same prompt (leave-one-out), so the advantage compares answers to one prompt, not prompts."))
    normalize_reward: bool = Field(True, description=(
        "Scale scores by their running mean/std: a reward model's scale is arbitrary (the demo's spans ~0.1), "
        "and unnormalised the KL penalty would drown it."))
    clip_reward: float | None = Field(None, gt=0, description="Clip (normalised) rewards to [-c, c].")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True

    # ---- optimisation ----
    ppo_epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0, description=(
        "Policy learning rate. 1e-5 moves a 135M policy measurably in a few dozen steps; lower it for "
        "larger models and longer runs."))
    value_learning_rate: float | None = Field(None, gt=0, description="Critic learning rate (default: learning_rate).")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip epsilon.")
    value_clip_range: float = Field(0.2, gt=0, description="Value prediction clip range.")
    vf_coef: float = Field(0.1, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    target_approx_kl: float | None = Field(None, gt=0, description="Stop a step's epochs early past this approx KL.")

    # ---- bookkeeping ----
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default). On a busy "
                                "machine 1 can be many times faster than contended threads.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="bfloat16 = autocast forward passes.")
    load_dtype: LoadDtype = Field("auto", description=(
        "Weights' dtype. auto: bfloat16 on a GPU that supports it for the reward model and the bases under LoRA "
        "adapters, float32 for fully trained weights (and the reference with them) and on CPU."))
    num_processes: int = Field(1, ge=1, description=(
        "Processes under `accelerate launch` (data parallel: each rolls out and trains on its block of "
        "whole prompt groups; the run file's stage launches them)."))
    save_every: int = Field(10, ge=1, description="Checkpoint every N steps (the latest one is kept).")
    sample_every: int = Field(5, ge=1, description="Store sample responses every N steps.")
    num_samples: int = Field(4, ge=0, description="Sample responses stored each time.")
    resume: bool = Field(True, description="Continue from the latest checkpoint of the same run setup.")
    output_dir: str | None = Field(None, description="Where models go (default: models/ beside the DuckDB file).")

    @field_validator("target_kl", mode="before")
    @classmethod
    def _zero_kl_target_is_fixed_beta(cls, v: Any) -> Any:
        # `--target-kl 0` (and `target_kl: 0` in a file) means "keep beta fixed", i.e. no adaptive target.
        return None if v == 0 and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of minibatch_size "
                             f"({self.minibatch_size})")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of samples_per_prompt "
                             f"({self.samples_per_prompt})")
        if self.batch_size % (self.num_processes * self.samples_per_prompt):
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_processes x "
                             f"samples_per_prompt ({self.num_processes} x {self.samples_per_prompt}): each process "
                             "rolls out whole prompt groups")
        if self.num_processes > 1 and self.rollout_engine == "vllm":
            raise ValueError("num_processes > 1 with rollout_engine vllm is not supported yet; use "
                             "rollout_engine transformers, or one process (vLLM's tensor parallelism)")
        if self.lora and self.rollout_engine == "vllm":
            raise ValueError("rollout_engine vllm cannot load LoRA adapters into its engine yet; use "
                             "rollout_engine transformers with lora, or full fine-tuning with vllm")
        return self

    # Fields that change how often things are logged or saved, or how fast it runs, not the weights.
    NOT_TRAINING: ClassVar[frozenset[str]] = frozenset({
        "steps", "eval_every", "eval_prompts", "eval_split", "eval_samples_per_prompt", "save_every", "sample_every",
        "num_samples", "resume", "output_dir", "device", "forward_batch_size", "generation_batch_size", "rollout_engine", "threads",
        "vllm_gpu_memory_utilization", "vllm_sleep_mode", "vllm_sleep_level", "num_processes"})

    def training_key(self, ids: dict[str, str]) -> str:
        """Identifies a training trajectory (constant LR: the first N steps don't depend on ``steps``)."""
        shaping = {k: v for k, v in self.model_dump().items() if k not in self.NOT_TRAINING}
        return content_hash("ppo", ids, shaping, length=12)


# =============================================================================================
# Masked statistics and the PPO math (pure functions, unit-tested against hand-computed values)
# =============================================================================================
def local(t: torch.Tensor) -> torch.Tensor:
    """A sum over this process's rows only: the ``total`` of one process."""
    return t


# ``total`` (below): how a sum over rows becomes a sum over the whole rollout batch. One process holds
# it all (``local``); under `accelerate launch` it is an all-reduce over the processes' shares, so the
# statistics (whitening, explained variance, token means) are the whole batch's on every process.
Total = Callable[[torch.Tensor], torch.Tensor]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, total: Total = local) -> torch.Tensor:
    return total((x * mask).sum()) / total(mask.sum()).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, total: Total = local) -> torch.Tensor:
    """Unbiased variance of the masked entries."""
    n = total(mask.sum())
    mean = masked_mean(x, mask, total)
    return total((((x - mean) ** 2) * mask).sum()) / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           total: Total = local) -> torch.Tensor:
    """Advantage whitening: zero mean, unit variance over the real tokens; padding stays 0."""
    mean, var = masked_mean(x, mask, total), masked_var(x, mask, total)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def apply_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Responses cut off at ``max_new_tokens`` without an EOS lose ``penalty`` reward."""
    return scores - penalty * (~has_eos).to(scores.dtype)


def leave_one_out_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scores`` holds ``group_size`` consecutive responses per prompt; each score minus the mean of
    the *other* responses to its prompt (RLOO's baseline: it does not depend on the response it
    corrects, so the policy gradient stays unbiased, and the prompt's own difficulty cancels)."""
    if group_size < 2:
        return scores
    g = scores.view(-1, group_size)
    others_mean = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - others_mean).reshape(scores.shape)


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-beta * (log pi - log pi_ref)`` everywhere, plus the sequence score
    at the last real token. Returns (rewards, per-token KL), both zero on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1  # index of the last real token (the EOS, or the cut-off token)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. The episode ends after the last real token (V = 0 there).

    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1} ;  R_t = A_t + V_t
    """
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask),
            # k3 estimator of KL(old || new), http://joschu.net/blog/kl-approx.html
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       total: Total = local) -> float:
    var_returns = masked_var(returns, mask, total)
    if var_returns.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, total) / var_returns)


class KLController:
    """Fixed beta (``target=None``) or the adaptive controller of Ziegler et al. (2019):
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, current_kl: float, n_rollouts: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_rollouts / self.horizon


class RunningMoments:
    """Running mean/std of rewards (Chan et al. parallel update) for reward normalisation."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load(self, s: dict[str, float]) -> None:
        self.mean, self.var, self.count = s["mean"], s["var"], int(s["count"])


# =============================================================================================
# Rewards: one interface, three implementations
# =============================================================================================
class Reward(Protocol):
    """Maps prompts (chat conversations) and response texts to one reward per response."""

    def __call__(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]: ...


class FunctionReward:
    """A Python function ``f(prompts, responses) -> list[float]`` (verifiable rewards, tests)."""

    def __init__(self, fn: Callable[[Sequence[Conversation], Sequence[str]], Sequence[float]], name: str | None = None):
        self.fn = fn
        self.name = name or f"python:{fn.__module__}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"

    def __call__(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
        return [float(x) for x in self.fn(prompts, responses)]


class JudgeReward:
    """d-RLAIF: a judge rates each response on 1..10; the expected rating, centred and scaled to
    about [-1, 1], is the reward.

    ADAPTER POINT: ``judge`` is any object with ``score(conversations, responses) -> list[float]``
    returning expected 1-10 ratings (the ``score`` method of cai/judge.py). Nothing else of the
    judge is used here.
    """

    def __init__(self, judge: Any, name: str, center: float = 5.5, scale: float = 4.5):
        self.judge, self.name, self.center, self.scale = judge, name, center, scale

    def __call__(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
        ratings = self.judge.score(list(prompts), list(responses))
        return [(float(r) - self.center) / self.scale for r in ratings]


class ScalarModel(nn.Module):
    """A transformer backbone with a scalar head: the reward model (pooled at the last real token)
    and the critic (one value per position) are both this. Loaded from an
    AutoModelForSequenceClassification folder, or from a causal LM with a fresh zero head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    @classmethod
    def load(cls, path: str, zero_head_if_new: bool = True, dtype: torch.dtype = torch.float32) -> ScalarModel:
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        config = AutoConfig.from_pretrained(path)
        is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized score weights" is expected for a causal LM
        try:
            seq = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        backbone = getattr(seq, seq.base_model_prefix)
        head = getattr(seq, "score", None) or getattr(seq, "classifier", None)
        if head is None:
            raise ValueError(f"{path}: cannot find the scalar head (expected .score or .classifier)")
        if not is_classifier and zero_head_if_new:
            for p in head.parameters():
                nn.init.zeros_(p)
        return cls(backbone, head.float())  # a few thousand weights: always float32, even on a bf16 backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, last_n: int | None = None) -> torch.Tensor:
        """Per-position scalars (B, L), or of the last ``last_n`` positions only."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        if last_n is not None:
            hidden = hidden[:, -last_n:]
        return self.head(hidden.to(next(self.head.parameters()).dtype)).squeeze(-1).float()


class RewardModelReward:
    """A frozen reward model: an AutoModelForSequenceClassification folder, read the way cai/rm.py reads
    it: the conversation (prompt + the response as the assistant's turn) through the chat template
    (or a plain ``role: text`` rendering when ``cai_reward.json`` says ``chat_template: false``),
    left-truncated to ``max_length``, the head on the last real token, minus the ``offset`` from
    ``cai_reward.json`` when there is one."""

    def __init__(self, path: str, name: str, device: torch.device, batch_size: int = 16, max_length: int = 1024,
                 autocast: Callable[[], Any] = nullcontext, dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer

        meta_file = Path(path) / "cai_reward.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        self.offset = float(meta.get("offset", 0.0))
        self.max_length = int(meta.get("max_length", max_length))
        self.use_chat_template = bool(meta.get("chat_template", True))
        self.path, self.name, self.device, self.batch_size, self.autocast = path, name, device, batch_size, autocast
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = ScalarModel.load(path, dtype=dtype).to(device).eval().requires_grad_(False)

    def text(self, prompt: Conversation, response: str) -> str:
        conversation = [{"role": m["role"], "content": m["content"]} for m in prompt]
        conversation.append({"role": "assistant", "content": response})
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation) + (self.tokenizer.eos_token or "")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
        texts = [self.text(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, padding_side="left",
                                 truncation=True, max_length=self.max_length, truncation_side="left",
                                 add_special_tokens=False).to(self.device)
            pos = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
            with self.autocast():
                # Left padding: the last position is every row's last real token.
                scores = self.model(enc["input_ids"], enc["attention_mask"], pos, last_n=1)[:, 0]
            out.extend((scores - self.offset).tolist())
        return out


def load_reward(store: Store, spec: str, device: torch.device, autocast: Callable[[], Any] = nullcontext,
                batch_size: int = 16, dtype: torch.dtype = torch.float32) -> tuple[Reward, str, str | None]:
    """(reward, reward id for the store, reward-model path or None) for a ``reward`` spec."""
    if spec.startswith("python:"):
        target = spec.removeprefix("python:")
        module_name, _, fn_name = target.rpartition(":")
        if not module_name or not fn_name:
            raise ValueError(f"reward {spec!r}: use python:module:function or python:path/file.py:function")
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise ValueError(f"reward {spec!r}: no such file {module_name}")
            mspec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if mspec is None or mspec.loader is None:
                raise ValueError(f"reward {spec!r}: cannot load {module_name}")
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:  # one line for the user, not an import traceback
                raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({e}); check the "
                                 "spelling and that it is on PYTHONPATH, or use python:path/file.py:function") from e
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no function {fn_name!r}")
        return FunctionReward(fn, name=spec), spec, None
    if spec.startswith("judge:"):
        from cai.judge import load_judge

        return JudgeReward(load_judge(spec.removeprefix("judge:")), name=spec), spec, None
    model_id, path = resolve_in_store(store, spec)
    return (RewardModelReward(path, model_id, device, batch_size=batch_size, autocast=autocast, dtype=dtype),
            model_id, path)


# --- tiny verifiable rewards, usable as python:cai.ppo:NAME ---------------------------------------
def reward_brevity(prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
    """Shorter is better: minus the response length in hundreds of characters."""
    return [-len(r) / 100 for r in responses]


def reward_spaces(prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
    """Share of the response's characters that are spaces (a dense signal even a random model can climb)."""
    return [r.count(" ") / max(len(r), 1) for r in responses]


# =============================================================================================
# Rollouts
# =============================================================================================
@dataclass
class Batch:
    """One rollout batch (or a minibatch of it): token tensors plus the experience computed on them."""

    input_ids: torch.Tensor        # (B, P+T) left-padded prompt, then response, then padding
    attention_mask: torch.Tensor   # (B, P+T)
    position_ids: torch.Tensor     # (B, P+T)
    response_mask: torch.Tensor    # (B, T) float, 1 on real response tokens (EOS included)
    logprobs: torch.Tensor | None = None       # (B, T) old policy
    ref_logprobs: torch.Tensor | None = None   # (B, T)
    values: torch.Tensor | None = None         # (B, T) critic, V(state before token t)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def T(self) -> int:
        return self.response_mask.shape[1]

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, -self.T:]

    def __getitem__(self, idx: torch.Tensor | slice) -> Batch:
        return Batch(**{k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    def to(self, device: torch.device) -> Batch:
        return Batch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def make_batch(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
               eos_ids: torch.Tensor) -> tuple[Batch, torch.Tensor]:
    """Assemble (prompt | response) rows and the response mask: tokens after the first EOS are padding.
    Returns (batch, has_eos)."""
    is_eos = torch.isin(responses, eos_ids)
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_first_eos).float()
    attention_mask = torch.cat([prompt_mask.long(), response_mask.long()], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    input_ids = torch.cat([prompt_ids, responses], 1)
    return Batch(input_ids, attention_mask, position_ids, response_mask), is_eos.any(1)


def response_logits(policy: nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """Logits (at the sampling temperature) that predicted each response token: (B, T, V).
    Only the last T+1 positions go through the LM head (``logits_to_keep``)."""
    out = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False, logits_to_keep=batch.T + 1)
    return out.logits[:, :-1].float() / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], without materialising the whole log-softmax."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, -1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and the entropy, sharing one logsumexp over the vocabulary."""
    lse = torch.logsumexp(logits, -1)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1)
    return logprobs, entropy


def response_values(critic: ScalarModel, batch: Batch) -> torch.Tensor:
    """V(s_t) for every response token t: the critic read at the position just before token t."""
    return critic(batch.input_ids, batch.attention_mask, batch.position_ids, last_n=batch.T + 1)[:, :-1]


class HFSampler:
    """Rollouts with transformers ``generate`` on the live policy: left-padded, batched, pure sampling
    (top-k and top-p off, so the behaviour policy is exactly softmax(logits / temperature))."""

    name = "transformers"

    def __init__(self, policy: nn.Module, eos_ids: list[int], pad_id: int, cfg: PPOConfig):
        from transformers import GenerationConfig

        self.policy = policy
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos_ids, pad_token_id=pad_id)

    def update_weights(self) -> None:
        """Nothing to do: generation uses the live policy."""

    def sleep(self) -> None:
        """Nothing to free: the policy is the generator."""

    def wake_up(self) -> None:
        """Nothing to restore."""

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        out = self.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                   generation_config=self.generation_config)
        return out[:, prompt_ids.shape[1]:]


def vllm_rollout_kwargs(cfg: PPOConfig, device: torch.device) -> tuple[dict[str, Any], str | None]:
    """The rollout engine's memory settings from the config: (``vllm.LLM`` keyword arguments, a note
    when sleep mode was asked for but this platform can't do it). vLLM's sleep mode needs its CUDA
    memory allocator, so it is only turned on for a CUDA device whose platform reports it available."""
    kwargs: dict[str, Any] = {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization}
    if not cfg.vllm_sleep_mode:
        return kwargs, None
    if device.type != "cuda":
        return kwargs, (f"vllm_sleep_mode skipped: vLLM sleep mode needs a CUDA GPU, the rollouts run on "
                        f"{device.type}; the engine stays awake during training")
    try:
        from vllm.platforms import current_platform

        available = current_platform.is_sleep_mode_available()
    except (ImportError, AttributeError) as e:  # an older or unusual vLLM build: don't guess
        return kwargs, f"vllm_sleep_mode skipped: can't tell whether this vLLM supports it ({e})"
    if not available:
        return kwargs, "vllm_sleep_mode skipped: this vLLM platform has no sleep mode; the engine stays awake"
    return kwargs | {"enable_sleep_mode": True}, None


class VLLMSampler:
    """Rollouts with vLLM's offline engine; the policy's new weights are loaded into it before each
    rollout (``update_weights``). Log-probs are still recomputed by our own forward passes, so the
    engine only proposes tokens."""

    name = "vllm"

    def __init__(self, policy: nn.Module, path: str, eos_ids: list[int], pad_id: int, cfg: PPOConfig,
                 max_model_len: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights load by reference
        from vllm import LLM, SamplingParams

        self.policy, self.pad_id, self.cfg = policy, pad_id, cfg
        device = next(policy.parameters()).device
        memory, note = vllm_rollout_kwargs(cfg, device)
        if note:
            log.warning(note)
        self.sleep_mode, self.asleep, self.sleep_note = bool(memory.get("enable_sleep_mode")), False, note
        self.llm = LLM(model=path, seed=cfg.seed, dtype="bfloat16" if cfg.dtype == "bfloat16" else "float32",
                       max_model_len=max_model_len, enforce_eager=device.type == "cpu",
                       enable_prefix_caching=False, **memory)
        self._params = lambda seed: SamplingParams(
            temperature=cfg.temperature, top_p=1.0, top_k=-1, max_tokens=cfg.max_new_tokens, seed=seed,
            stop_token_ids=eos_ids, skip_special_tokens=False, detokenize=False)

    def sleep(self) -> None:
        """Free the engine's GPU memory for training (sleep mode only; a no-op otherwise)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=self.cfg.vllm_sleep_level)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def update_weights(self) -> None:
        self.wake_up()  # weights can only be loaded into an awake engine
        # vLLM's in-place reload (the worker re-runs its checkpoint-format loaders and post-processing);
        # in-process, the tensors are passed by reference.
        weights = [(k, v.detach()) for k, v in self.policy.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int) -> torch.Tensor:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist())
                   for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        # One seed per request: the same prompt sampled k times in a batch must give k different answers.
        outs = self.llm.generate(prompts, [self._params(seed + i) for i in range(len(prompts))], use_tqdm=False)
        toks = [list(o.outputs[0].token_ids) for o in outs]
        T = max(len(t) for t in toks)
        resp = torch.full((len(toks), T), self.pad_id, dtype=torch.long)
        for i, t in enumerate(toks):
            resp[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        return resp.to(prompt_ids.device)


# =============================================================================================
# The trainer
# =============================================================================================
class PPOError(RuntimeError):
    """Training stopped: NaN/inf or a KL blow-up. ``checkpoint`` is the last good one (or None)."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message + (f"; the last good checkpoint is {checkpoint}" if checkpoint else
                                    "; no checkpoint had been saved yet"))
        self.checkpoint = checkpoint


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def models_root(store: Store, cfg_output_dir: str | None = None) -> Path:
    """Trained models live in ``models/`` beside the DuckDB file (``data/models`` for the default store)."""
    return Path(cfg_output_dir) if cfg_output_dir else store.path.parent / "models"


class PPOTrainer:
    """Holds the four models and the optimiser; ``train()`` runs the loop. Used by ``run_ppo`` (and the
    benchmark), which do the store bookkeeping around it."""

    def __init__(self, cfg: PPOConfig, policy_path: str, ref_path: str, value_path: str, reward: Reward,
                 device: torch.device | None = None, dist: Dist | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.dist = dist or Dist()  # one process unless under `accelerate launch`
        self.device = device or pick_device(cfg.device)
        self.reward = reward
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id

        # Weights' dtype: float32 master weights for what AdamW updates in full; with LoRA the bases are
        # frozen and load in bf16 on a bf16 GPU (load_dtype auto), the adapters stay float32 (peft). The
        # reference takes the policy's dtype: rounded differently, it would show a KL before any update.
        trained = load_dtype_for(cfg.load_dtype, self.device, trained=not cfg.lora)

        # Actor, reference, critic. No dropout anywhere (``remove_dropout``), so the old log-probs
        # recomputed here equal the ones the gradient sees in the first minibatch (ratio == 1); the
        # models sit in eval mode except during ``optimise`` (train mode is what makes transformers
        # checkpoint activations, and with dropout gone it changes nothing else).
        self.policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=trained)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        if cfg.lora:
            self.policy = add_lora(self.policy, cfg, "CAUSAL_LM")
        self.policy = remove_dropout(self.policy).to(self.device).eval()
        # Reference: with LoRA on the starting weights it is the policy with its adapters disabled
        # (``reference_logits``): no second copy in memory, which lets a 7B policy train on one device.
        self.ref: nn.Module | None = None
        if not (cfg.lora and ref_path == policy_path):
            self.ref = remove_dropout(AutoModelForCausalLM.from_pretrained(ref_path, dtype=trained)).to(
                self.device).eval().requires_grad_(False)
        # Critic: its own backbone (by default the reward model's) with a float32 value head; under LoRA
        # the backbone gets adapters too and the head stays fully trainable.
        self.critic = ScalarModel.load(value_path, dtype=trained)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.critic.backbone)
        if cfg.lora:
            self.critic.backbone = add_lora(self.critic.backbone, cfg, None)
        self.critic = remove_dropout(self.critic).to(self.device).eval()
        self._check_critic_vocab(value_path)

        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.policy.generation_config, "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_ids = sorted(e for e in eos if e is not None)
        self.eos_tensor = torch.tensor(self.eos_ids, device=self.device)

        self.optimizer = torch.optim.AdamW([
            {"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": cfg.learning_rate},
            {"params": [p for p in self.critic.parameters() if p.requires_grad],
             "lr": cfg.value_learning_rate or cfg.learning_rate},
        ], eps=1e-5, weight_decay=0.0, fused=self.device.type in ("cpu", "cuda"))  # fused: ~8x faster on CPU
        self.kl_ctl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.reward_stats = RunningMoments()
        self.sampler: HFSampler | VLLMSampler
        if cfg.rollout_engine == "vllm":
            self.sampler = VLLMSampler(self.policy, policy_path, self.eos_ids, self.pad_id, cfg,
                                       max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens + 8)
        else:
            self.sampler = HFSampler(self.policy, self.eos_ids, self.pad_id, cfg)

    def _check_critic_vocab(self, value_path: str) -> None:
        from transformers import AutoTokenizer

        critic_tok = AutoTokenizer.from_pretrained(value_path)
        if critic_tok.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"the critic ({value_path}) uses a different tokenizer from the policy; it reads the "
                             "policy's tokens, so start it from a model with the same tokenizer (--value-model)")

    def autocast(self):
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- prompts ---------------------------------------------------------------------------
    def encode_prompts(self, conversations: Sequence[Conversation]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def prompt_length(self, conversation: Conversation) -> int:
        text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- 1. rollout ------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, conversations: Sequence[Conversation], seed: int) -> tuple[Batch, torch.Tensor, list[str]]:
        """Sample one response per prompt. Returns (batch, has_eos, response texts)."""
        chunk = self.cfg.generation_batch_size or len(conversations)
        self.sampler.wake_up()  # (held-out evaluation rollouts come here between steps too)
        pieces = []
        for i in range(0, len(conversations), chunk):
            ids, mask = self.encode_prompts(conversations[i:i + chunk])
            with self.autocast():
                resp = self.sampler.sample(ids, mask, seed + i)
            pieces.append((ids, mask, resp))
        if len(pieces) == 1:
            ids, mask, resp = pieces[0]
        else:  # re-pad chunks to common widths: prompts on the left, responses on the right
            P = max(p[0].shape[1] for p in pieces)
            T = max(p[2].shape[1] for p in pieces)
            ids = torch.cat([F.pad(p[0], (P - p[0].shape[1], 0), value=self.pad_id) for p in pieces])
            mask = torch.cat([F.pad(p[1], (P - p[1].shape[1], 0), value=0) for p in pieces])
            resp = torch.cat([F.pad(p[2], (0, T - p[2].shape[1]), value=self.pad_id) for p in pieces])
        batch, has_eos = make_batch(ids, mask, resp, self.eos_tensor)
        texts = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                 for r, m in zip(batch.responses, batch.response_mask, strict=True)]
        return batch, has_eos, texts

    # ---- 3. experience ---------------------------------------------------------------------
    @torch.no_grad()
    def experience(self, batch: Batch) -> tuple[Batch, torch.Tensor]:
        """Old log-probs, reference log-probs and values for a rollout batch (+ per-token entropy)."""
        lps, ref_lps, vals, ents = [], [], [], []
        for i in range(0, batch.input_ids.shape[0], self.cfg.forward_batch_size):
            mb = batch[i:i + self.cfg.forward_batch_size]
            with self.autocast():
                logits = response_logits(self.policy, mb, self.cfg.temperature)
                lp, ent = logprobs_and_entropy(logits, mb.responses)
                lps.append(lp)
                ents.append(ent)
                del logits
                ref_logits = self.reference_logits(mb)
                ref_lps.append(token_logprobs(ref_logits, mb.responses))
                del ref_logits
                vals.append(response_values(self.critic, mb))
        m = batch.response_mask
        batch.logprobs = torch.cat(lps) * m
        batch.ref_logprobs = torch.cat(ref_lps) * m
        batch.values = torch.cat(vals) * m
        return batch, torch.cat(ents) * m

    def reference_logits(self, mb: Batch) -> torch.Tensor:
        """The reference's logits: its frozen copy, or (LoRA) the policy with its adapters switched off."""
        if self.ref is None:
            with self.policy.disable_adapter():
                return response_logits(self.policy, mb, self.cfg.temperature)
        return response_logits(self.ref, mb, self.cfg.temperature)

    # ---- 2. score --------------------------------------------------------------------------
    def shape_scores(self, raw: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """EOS-missing penalty, the per-prompt baseline (rows come in groups of ``samples_per_prompt``),
        then optional running normalisation and clipping."""
        scores = apply_eos_penalty(raw, has_eos, self.cfg.missing_eos_penalty)
        if self.cfg.group_baseline:
            scores = leave_one_out_baseline(scores, self.cfg.samples_per_prompt)
        if self.cfg.normalize_reward:
            self.reward_stats.update(scores)
            scores = (scores - self.reward_stats.mean) / self.reward_stats.std
        if self.cfg.clip_reward is not None:
            scores = scores.clamp(-self.cfg.clip_reward, self.cfg.clip_reward)
        return scores

    # ---- one PPO step ----------------------------------------------------------------------
    def my_rows(self, n: int) -> tuple[int, int]:
        """This process's rows [lo, hi) of an ``n``-row rollout batch: a contiguous block of whole
        prompt groups (the config makes ``batch_size`` a multiple of processes x samples_per_prompt)."""
        size = n // self.dist.world
        return self.dist.rank * size, (self.dist.rank + 1) * size

    def gather_rows(self, x: torch.Tensor, lo: int, n: int) -> torch.Tensor:
        """Every process's rows of a per-row tensor, in batch order: (n, ...) on every process."""
        if not self.dist.active:
            return x
        full = torch.zeros((n, *x.shape[1:]), dtype=torch.float64, device=x.device)
        full[lo:lo + x.shape[0]] = x.double()
        return self.dist.sum_tensor(full).to(x.dtype)

    def step(self, conversations: Sequence[Conversation], seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        """Rollout, score, advantages, optimise. Returns (metrics, details for samples).

        Several processes: each rolls out, scores and trains on its block of ``conversations`` (rows
        ``lo:hi``, sampled with the seeds one process would use for them with ``generation_batch_size``
        = the block), while every statistic that mixes rows (reward normalisation, whitening, token
        means, the KL controller, each minibatch's loss) is taken over the whole batch."""
        cfg = self.cfg
        total: Total = self.dist.sum_tensor if self.dist.active else local
        n_rows = len(conversations)
        lo, hi = self.my_rows(n_rows)
        mine = list(conversations[lo:hi])
        t0 = time.perf_counter()
        self.sampler.update_weights()
        batch, has_eos, texts = self.rollout(mine, seed + lo)
        self.sampler.sleep()  # vLLM sleep mode: scoring and training get its GPU memory until the next rollout
        t_gen = time.perf_counter() - t0

        t1 = time.perf_counter()
        my_raw = torch.tensor(self.reward(mine, texts), dtype=torch.float32, device=self.device)
        batch, entropy = self.experience(batch)
        t_score = time.perf_counter() - t1
        mask = batch.response_mask
        # the whole batch's sequence-level numbers, on every process (a few floats per row)
        raw = self.gather_rows(my_raw, lo, n_rows)
        all_eos = self.gather_rows(has_eos.float(), lo, n_rows) > 0.5
        lengths = self.gather_rows(mask.sum(1), lo, n_rows)
        diverged = self.gather_rows(~(torch.isfinite(batch.logprobs).all(1) & torch.isfinite(batch.values).all(1)),
                                    lo, n_rows)
        if not torch.isfinite(raw).all():
            raise FloatingPointError(f"the reward returned non-finite values: {raw.tolist()}")
        if diverged.any():
            raise FloatingPointError("non-finite log-probs or values in the rollout (the weights have diverged)")

        # 4. per-token rewards: KL penalty everywhere, the (shaped) sequence score at the last token.
        scores = self.shape_scores(raw, all_eos)  # over the whole batch: the running moments see every row
        beta = self.kl_ctl.value
        rewards, kl = per_token_rewards(scores[lo:hi], batch.logprobs, batch.ref_logprobs, mask, beta)
        my_kl_per_seq = kl.sum(1)
        kl_per_seq = self.gather_rows(my_kl_per_seq, lo, n_rows)
        # 5. GAE (per row) and whitening (over every real token of the batch).
        advantages, returns = gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask, total=total)
        batch.advantages, batch.returns = advantages, returns
        ev = explained_variance(batch.values, returns, mask, total)
        rollout_stats = {
            "reward": raw.mean().item(), "reward_std": raw.std().item() if raw.numel() > 1 else 0.0,
            "score": scores.mean().item(), "kl": kl_per_seq.mean().item(), "kl_coef": beta,
            "non_score_reward": (-beta * kl_per_seq).mean().item(),
            "entropy": masked_mean(entropy, mask, total).item(), "explained_variance": ev,
            "response_length": lengths.mean().item(), "eos_fraction": all_eos.float().mean().item(),
            "value_mean": masked_mean(batch.values, mask, total).item(),
            "return_mean": masked_mean(returns, mask, total).item(),
        }

        # 6. optimisation: several epochs of shuffled minibatches.
        t2 = time.perf_counter()
        train_stats = self.optimise(batch, lengths, lo, seed)
        t_train = time.perf_counter() - t2

        # 7. adapt beta to the KL the rollouts showed.
        self.kl_ctl.update(rollout_stats["kl"], n_rows)
        n_tokens = lengths.sum().item()
        elapsed = time.perf_counter() - t0
        metrics = {**rollout_stats, **train_stats,
                   "generation_seconds": t_gen, "scoring_seconds": t_score, "training_seconds": t_train,
                   "step_seconds": elapsed, "tokens_per_second": n_tokens / elapsed,
                   "generation_tokens_per_second": n_tokens / t_gen if t_gen else float("nan")}
        # this process's rows (rank 0's are the batch's first ones: what run_ppo stores as samples)
        details = {"texts": texts, "raw": my_raw.tolist(), "kl": my_kl_per_seq.tolist(),
                   "lengths": mask.sum(1).long().tolist(), "has_eos": has_eos.tolist()}
        return metrics, details

    def optimise(self, batch: Batch, lengths: torch.Tensor, lo: int, seed: int) -> dict[str, float]:
        cfg = self.cfg
        self.policy.train(cfg.gradient_checkpointing)  # train mode: activation checkpointing (no dropout to turn on)
        self.critic.train(cfg.gradient_checkpointing)
        try:
            return self._optimise(batch, lengths, lo, seed)
        finally:
            self.policy.eval()  # generate() wants eval mode (its KV cache is off under checkpointing)
            self.critic.eval()

    def _optimise(self, batch: Batch, lengths: torch.Tensor, lo: int, seed: int) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches over the whole batch (``lengths``: every row's
        response tokens; this process holds rows ``lo:lo + len(batch)``). A minibatch's loss is its
        token mean: each process back-propagates its rows' share (their token sum over the
        minibatch's token count) and the gradients are summed, so the update is the one-process one."""
        cfg = self.cfg
        lengths = lengths.cpu()
        B, mine = lengths.shape[0], batch.input_ids.shape[0]
        trainable = [p for p in [*self.policy.parameters(), *self.critic.parameters()] if p.requires_grad]
        sums: dict[str, float] = {}
        n = 0
        stop_early = False
        for epoch in range(cfg.ppo_epochs):
            # A seeded order (not the global RNG, which sampling leaves in a different state on each process).
            order = torch.randperm(B, generator=torch.Generator().manual_seed(seed * 31 + epoch))
            for start in range(0, B, cfg.minibatch_size):
                rows = order[start:start + cfg.minibatch_size]
                local_rows = rows[(rows >= lo) & (rows < lo + mine)] - lo
                share = float(lengths[lo + local_rows].sum() / lengths[rows].sum().clamp(min=1))
                # (one process: local_rows == rows and share == 1, the plain minibatch token mean)
                self.optimizer.zero_grad(set_to_none=True)
                stats: dict[str, torch.Tensor | float] = {}
                if len(local_rows):
                    mb = batch[local_rows.to(self.device)]
                    m = mb.response_mask
                    with self.autocast():
                        logits = response_logits(self.policy, mb, cfg.temperature)
                        new_logprobs = token_logprobs(logits, mb.responses)
                        new_values = response_values(self.critic, mb)
                    pg_loss, pg_stats = policy_loss(new_logprobs, mb.logprobs, mb.advantages, m, cfg.clip_range)
                    vf_loss, vf_stats = value_loss(new_values, mb.values, mb.returns, m, cfg.value_clip_range)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    if cfg.entropy_coef > 0:
                        loss = loss - cfg.entropy_coef * masked_mean(entropy_from_logits(logits), m)
                    if not torch.isfinite(loss) and not self.dist.active:  # (several: the summed gradient says)
                        raise FloatingPointError(f"loss is {loss.item()} (policy {pg_loss.item()}, "
                                                 f"value {vf_loss.item()})")
                    (loss * share).backward()
                    stats = {k: float(v.detach()) * share for k, v in
                             {"policy_loss": pg_loss, "value_loss": vf_loss, **pg_stats, **vf_stats}.items()}
                stats = self.dist.sum_values({k: stats.get(k, 0.0) for k in MINIBATCH_STATS})
                self.dist.sum_gradients(trainable)  # several processes: the whole minibatch's gradient on each
                grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                value_grad_norm = nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                if not (torch.isfinite(grad_norm) and torch.isfinite(value_grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError("gradient norm is not finite")
                self.optimizer.step()
                for k, v in {**stats, "grad_norm": float(grad_norm), "value_grad_norm": float(value_grad_norm)}.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                if cfg.target_approx_kl is not None and stats["approx_kl"] > cfg.target_approx_kl:
                    stop_early = True
                    break
            if stop_early:
                break
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / max(n, 1) for k, v in sums.items()}
        out["minibatch_updates"] = float(n)
        return out

    # ---- held-out evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, conversations: Sequence[Conversation], seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        batch, has_eos, texts = self.rollout(conversations, seed)
        raw = torch.tensor(self.reward(conversations, texts), dtype=torch.float32)
        batch, _ = self.experience(batch)
        kl = ((batch.logprobs - batch.ref_logprobs) * batch.response_mask).sum(1)
        metrics = {"reward": raw.mean().item(), "kl": kl.mean().item(),
                   "response_length": batch.response_mask.sum(1).mean().item(),
                   "eos_fraction": has_eos.float().mean().item()}
        return metrics, {"texts": texts, "raw": raw.tolist(), "kl": kl.tolist(),
                         "lengths": batch.response_mask.sum(1).long().tolist(), "has_eos": has_eos.tolist()}

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, root: Path, step: int, extra: dict[str, Any]) -> Path:
        """Write ``root/step-NNNNNN`` atomically, then drop older checkpoints."""
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        tmp = root / f".step-{step:06d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        if self.cfg.lora:  # only what trains (adapters, the value head): the frozen bases are the starting models
            tmp.mkdir(parents=True)
            policy_state, critic_state = trainable_state(self.policy), trainable_state(self.critic)
            torch.save(policy_state, tmp / "policy_adapters.pt")
        else:
            self.policy.save_pretrained(tmp / "policy", safe_serialization=True)
            critic_state = self.critic.state_dict()
        torch.save({"critic": critic_state, "optimizer": self.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "kl_coef": self.kl_ctl.value, "reward_stats": self.reward_stats.state(), **extra},
            default=str))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        if self.cfg.lora:
            self._load_adapters(path)
        else:
            self._load_policy(path)
        state = torch.load(path / "trainer.pt", map_location=self.device, weights_only=True)
        self.critic.load_state_dict(state["critic"], strict=not self.cfg.lora)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        meta = json.loads((path / "state.json").read_text())
        self.kl_ctl.value = meta["kl_coef"]
        self.reward_stats.load(meta["reward_stats"])
        return meta

    def _load_adapters(self, path: Path) -> None:
        weights = torch.load(path / "policy_adapters.pt", map_location=self.device, weights_only=True)
        missing = set(trainable_state(self.policy)) - set(weights)
        if missing:
            raise RuntimeError(f"checkpoint {path} does not match the policy's adapters: missing {sorted(missing)[:3]}")
        self.policy.load_state_dict(weights, strict=False)

    def _load_policy(self, path: Path) -> None:
        from safetensors.torch import load_file

        weights = {}
        for f in sorted((path / "policy").glob("*.safetensors")):
            weights.update(load_file(str(f), device=str(self.device)))
        missing, unexpected = self.policy.load_state_dict(weights, strict=False)
        missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the policy: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        self.policy.tie_weights()

    def final_policy(self) -> nn.Module:
        """The policy to save: a plain transformers model (LoRA adapters merged into their base)."""
        return self.policy.merge_and_unload() if self.cfg.lora else self.policy


# What each minibatch reports (token means over the minibatch, summed over the processes' shares).
MINIBATCH_STATS = ("policy_loss", "value_loss", "clip_frac", "approx_kl", "ratio", "value_clip_frac")


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in root.glob("step-*") if (p / "state.json").exists())
    return found[-1] if found else None


def paired_reward_gain(store: Store, run_id: str, start: int, end: int) -> dict[str, float]:
    """Held-out reward at step ``end`` minus step ``start``, paired by prompt: the mean over prompts of
    (mean reward of the prompt's responses at ``end`` - at ``start``) and its standard error. Pairing
    removes the prompts' own spread (some prompts always score higher), which dominates an unpaired
    comparison of two means."""
    rows = store.query(
        "SELECT prompt_id, avg(reward) FILTER (WHERE step = ?) AS r0, avg(reward) FILTER (WHERE step = ?) AS r1 "
        "FROM samples WHERE run_id = ? AND split = 'test' GROUP BY prompt_id", [start, end, run_id])
    diffs = [r["r1"] - r["r0"] for r in rows if r["r0"] is not None and r["r1"] is not None]
    if len(diffs) < 2:
        return {}
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    return {"eval_reward_gain": mean, "eval_reward_gain_se": se, "eval_reward_gain_prompts": len(diffs)}


def prompt_indices(n_prompts: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Prompts for a step: passes over a fresh seeded permutation each time, so any step can be
    recomputed (resume) without replaying the ones before it."""
    out, perms = [], {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_prompts)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


# =============================================================================================
# The stage: store in, store out
# =============================================================================================
def _metric_rows(run_id: str, model_id: str, step: int, split: str, metrics: dict[str, float]) -> list[dict]:
    stamp = now()
    return [{"run_id": run_id, "model_id": model_id, "step": step, "split": split, "name": k,
             "value": None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v),
             "created_at": stamp} for k, v in metrics.items()]


def _sample_rows(run_id: str, model_id: str, step: int, split: str, prompts: list[dict], details: dict,
                 limit: int) -> list[dict]:
    stamp = now()
    rows = []
    for i, p in enumerate(prompts[:limit]):
        rows.append({
            "sample_id": content_hash("sample", run_id, step, split, i), "run_id": run_id, "model_id": model_id,
            "step": step, "split": split, "prompt_id": p["prompt_id"],
            "prompt": p["messages"][-1]["content"] if p["messages"] else "",
            "response": details["texts"][i], "reward": details["raw"][i], "kl": details["kl"][i],
            "num_tokens": details["lengths"][i], "finish_reason": "stop" if details["has_eos"][i] else "length",
            "created_at": stamp})
    return rows


def run_ppo(store: Store, cfg: PPOConfig, *, reward: Reward | None = None, progress: bool = True,
            plot: bool = True, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train a policy with PPO on the store's prompts; returns a summary.

    ``reward`` overrides ``cfg.reward`` with a live object (a Python function reward in tests).
    ``stop_after_steps``: checkpoint and return after this many steps (the same call resumes).
    Raises ``PPOError`` when training stops on NaN/inf or a KL blow-up.

    Under `accelerate launch` (``WORLD_SIZE`` > 1) each process rolls out and trains on its block of
    every batch (``PPOTrainer.step``); rank 0 alone evaluates, writes to the store and saves.
    """
    with sigterm_as_interrupt():  # a `kill` marks the run 'interrupted' (resumable), like Ctrl-C
        return _run_ppo(store, cfg, reward=reward, progress=progress, plot=plot, stop_after_steps=stop_after_steps)


def _run_ppo(store: Store, cfg: PPOConfig, *, reward: Reward | None, progress: bool, plot: bool,
             stop_after_steps: int | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from cai.generate import select_prompts

    started = time.time()
    dist = Dist()  # under `accelerate launch`: this process's rank; rank 0 alone writes to the store and disk
    if cfg.batch_size % (dist.world * cfg.samples_per_prompt):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of processes x samples_per_prompt "
                         f"({dist.world} x {cfg.samples_per_prompt})")
    device = dist.device_for(cfg.device)
    policy_id, policy_path = resolve_in_store(store, cfg.policy)
    ref_id, ref_path = resolve_in_store(store, cfg.ref) if cfg.ref else (policy_id, policy_path)

    # ---- reward and critic -------------------------------------------------------------------
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) \
        if cfg.dtype == "bfloat16" else nullcontext
    reward_path: str | None = None
    if reward is not None:
        if not isinstance(reward, FunctionReward | JudgeReward | RewardModelReward):
            reward = FunctionReward(reward, name=getattr(reward, "name", None))
        reward_id = reward.name
    elif cfg.reward:
        reward, reward_id, reward_path = load_reward(store, cfg.reward, device, autocast, cfg.forward_batch_size,
                                                     dtype=load_dtype_for(cfg.load_dtype, device))
    else:
        raise ValueError("PPO needs a reward: --reward MODEL (a reward model id or folder), judge:SPEC, "
                         "or python:module:function")
    if cfg.value_model:
        value_id, value_path = resolve_in_store(store, cfg.value_model)
    elif reward_path:
        value_id, value_path = reward_id, reward_path
    else:
        value_id, value_path = policy_id, policy_path

    ids = {"policy": policy_id, "ref": ref_id, "reward": reward_id, "value": value_id}
    # The prompt set is part of what is trained: other prompts (new ones ingested) are another model.
    selected = select_prompts(store, split=cfg.split, category=cfg.category, limit=cfg.limit)
    held_out = select_prompts(store, split=cfg.eval_split, category=cfg.category) if cfg.eval_split else []
    prompt_set = content_hash(sorted(p["prompt_id"] for p in selected), sorted(p["prompt_id"] for p in held_out))
    key = content_hash(cfg.training_key(ids), prompt_set, length=12)
    model_id = f"ppo-{content_hash(key, cfg.steps, length=12)}"
    root = models_root(store, cfg.output_dir)
    out_dir, ckpt_root = root / model_id, root / "checkpoints" / f"ppo-{key}"
    if store.path.exists():
        done = store.query("SELECT path FROM models WHERE model_id = ?", [model_id])
        if done and done[0]["path"] and Path(done[0]["path"]).exists():
            return {"model_id": model_id, "path": done[0]["path"], "already_trained": True}

    # ---- prompts -------------------------------------------------------------------------------
    trainer = PPOTrainer(cfg, policy_path, ref_path, value_path, reward, device, dist)
    prompts = [p for p in selected if trainer.prompt_length(p["messages"]) <= cfg.max_prompt_tokens]
    if len(prompts) < 1:
        raise LookupError(f"no {cfg.split or ''} prompts in {store.path} (of at most {cfg.max_prompt_tokens} "
                          "tokens); load some with `cai ingest FILE`")
    eval_prompts = []
    if cfg.eval_split:
        eval_prompts = [p for p in held_out
                        if trainer.prompt_length(p["messages"]) <= cfg.max_prompt_tokens][:cfg.eval_prompts]

    # ---- resume or start -----------------------------------------------------------------------
    start_step, run_id = 0, None
    ckpt = latest_checkpoint(ckpt_root) if cfg.resume else None
    if not cfg.resume and dist.main:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    if ckpt is not None:
        meta = trainer.load_checkpoint(ckpt)
        start_step, run_id = meta["step"] + 1, meta["run_id"]
    dist.barrier()  # every rank has read the store and the checkpoint before rank 0 writes
    if ckpt is not None and dist.main:
        with store.write() as con:  # forget what the crashed run logged after its checkpoint
            con.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [run_id, meta["step"]])
            con.execute("DELETE FROM samples WHERE run_id = ? AND step > ?", [run_id, meta["step"]])
            con.execute("UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, host = ?, pid = ?, "
                        "heartbeat_at = ? WHERE run_id = ?", [runs.host(), os.getpid(), now(), run_id])
        runs.attach(store, run_id)  # this process owns the resumed run now (heartbeat, SIGTERM)
    if run_id is None:
        run_id = store.start_run("ppo", {**cfg.model_dump(), **{f"{k}_id": v for k, v in ids.items()},
                                         "model_id": model_id, "processes": dist.world}) if dist.main else ""
    summary: dict[str, Any] = {"run_id": run_id, "model_id": model_id, "train_prompts": len(prompts),
                               "eval_prompts": len(eval_prompts), "resumed_from_step": start_step or None,
                               "engine": trainer.sampler.name, "device": str(device)}

    def evaluate(step: int) -> dict[str, float]:
        if not eval_prompts or not dist.main:  # rank 0 evaluates; the others wait at the next all-reduce
            return {}
        # The same prompts and sampling seed at every evaluation, so the curve moves with the policy only.
        repeated = [p for p in eval_prompts for _ in range(cfg.eval_samples_per_prompt)]
        m, details = trainer.evaluate([p["messages"] for p in repeated], seed=cfg.seed + 10**6)
        store.insert("metrics", _metric_rows(run_id, model_id, step, "test", m))
        # Every held-out response is kept (a few dozen rows): the paired gain below is computed from them.
        store.insert("samples", _sample_rows(run_id, model_id, step, "test", repeated, details, len(repeated)))
        return m

    last_ckpt = ckpt
    bar = tqdm(total=cfg.steps, initial=start_step, desc="ppo", unit="step", disable=not progress or not dist.main)
    step = start_step
    try:
        if start_step == 0:
            first_eval = evaluate(0)
            if first_eval:
                summary["eval_reward_start"] = first_eval["reward"]
        stopped_at = None
        for step in range(start_step, cfg.steps):
            if stop_after_steps is not None and step - start_step >= stop_after_steps:
                stopped_at = step
                break
            # batch_size / k prompts, each k times in a row (k = samples_per_prompt; the group baseline
            # relies on that order).
            k = cfg.samples_per_prompt
            chosen = [prompts[i] for i in prompt_indices(len(prompts), step, cfg.batch_size // k, cfg.seed)
                      for _ in range(k)]
            try:
                metrics, details = trainer.step([p["messages"] for p in chosen], seed=cfg.seed * 100003 + step)
            except FloatingPointError as e:
                raise PPOError(f"PPO step {step}: {e}", last_ckpt) from e
            if dist.main:
                store.insert("metrics", _metric_rows(run_id, model_id, step, "train", metrics))
            if dist.main and cfg.num_samples and (step % cfg.sample_every == 0 or step == cfg.steps - 1):
                # details hold this process's rows: rank 0's are the batch's first ones
                store.insert("samples", _sample_rows(run_id, model_id, step, "train", chosen[:len(details["texts"])],
                                                     details, cfg.num_samples))
            if metrics["kl"] > cfg.max_kl:
                raise PPOError(f"PPO step {step}: KL to the reference blew up ({metrics['kl']:.2f} nats > max_kl "
                               f"{cfg.max_kl}); lower the learning rate or raise kl_coef", last_ckpt)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.2f}",
                            s=f"{metrics['step_seconds']:.1f}")
            bar.update(1)
            if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                evaluate(step + 1)
            if ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps) and dist.main:
                last_ckpt = trainer.save_checkpoint(ckpt_root, step, {"run_id": run_id, "model_id": model_id})
        if stopped_at is not None:  # stopped part-way on purpose: a checkpoint to resume from
            bar.close()
            if dist.main:
                trainer.save_checkpoint(ckpt_root, stopped_at - 1, {"run_id": run_id, "model_id": model_id})
                store.finish_run(run_id, "stopped", {**summary, "stopped_at_step": stopped_at})
            dist.barrier()
            return {**summary, "finished": False, "stopped_at_step": stopped_at}
        final_eval = evaluate(cfg.steps)
        if final_eval:
            summary["eval_reward_end"] = final_eval["reward"]
            summary["eval_kl_end"] = final_eval["kl"]
            summary.update(paired_reward_gain(store, run_id, 0, cfg.steps))
    except BaseException as e:
        bar.close()
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        if dist.main:
            store.finish_run(run_id, status, {**summary, "failed_at_step": step,
                                              "last_checkpoint": str(last_ckpt) if last_ckpt else None},
                             error=str(e))
        raise
    bar.close()
    if not dist.main:  # rank 0 saves and registers the model
        dist.barrier()
        return {**summary, "rank": dist.rank}

    # ---- the final policy: a plain Hugging Face checkpoint, registered with its parents --------
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.final_policy().save_pretrained(tmp, safe_serialization=True)
    trainer.tokenizer.save_pretrained(tmp)
    hyper = {**cfg.model_dump(), "final_kl_coef": trainer.kl_ctl.value}
    (tmp / "cai_ppo.json").write_text(json.dumps({"model_id": model_id, "run_id": run_id, "parents": ids,
                                                  "params": hyper}, indent=2, default=str))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    train_rows = store.query("SELECT value FROM metrics WHERE run_id = ? AND split = 'train' AND name = 'reward' "
                             "ORDER BY step", [run_id])
    rewards = [r["value"] for r in train_rows]
    k = max(1, min(5, len(rewards) // 4))
    summary.update({
        "path": str(out_dir), "steps": cfg.steps,
        "train_reward_first": sum(rewards[:k]) / k if rewards else None,
        "train_reward_last": sum(rewards[-k:]) / k if rewards else None,
        "seconds": round(time.time() - started, 1),
    })
    register_sources(store, (policy_id, policy_path), (ref_id, ref_path), (reward_id, reward_path),
                     (value_id, value_path))
    store.register_model(model_id, "policy", str(out_dir), base_model_id=policy_id,
                         parent_ids=[policy_id, reward_id, ref_id], params=hyper,
                         data_snapshot={"train_prompts": len(prompts),
                                        "prompt_ids_hash": content_hash(sorted(p["prompt_id"] for p in prompts)),
                                        "value_model": value_id}, run_id=run_id)
    if plot:
        from cai.plots import plot_training_curves

        png = plot_training_curves(store, run_id, out_dir / "training_curves.png", title=f"PPO {model_id}")
        summary["plot"] = str(png)
    shutil.rmtree(ckpt_root, ignore_errors=True)  # the final model supersedes the checkpoints
    store.finish_run(run_id, "ok", summary)
    dist.barrier()
    return summary
