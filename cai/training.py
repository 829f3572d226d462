"""What the supervised trainers (``cai/sft.py``, ``cai/reward.py``) share (DPO and PPO use the LoRA /
gradient-checkpointing / dtype helpers, checkpoints and ``Dist`` too): the optimisation config,
device and precision choice, AdamW with a warm-up + cosine schedule, a seeded data order,
checkpoints that resume bit for bit, a buffered metrics writer and the prompt-level train/val split.

Each trainer keeps its own data, loss and loop in its own file; only this plumbing lives here, so a
fix to (say) checkpoint pruning reaches both.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai.models import DEFAULT_MODEL
from cai.store import Store, content_hash, now

# Fields that change how a run is carried out but not which model comes out of it; they are left
# out of the model id, so changing them does not start a new model (or break a resume).
RUNTIME_FIELDS = {"model_id", "output_dir", "eval_every", "save_every", "keep_checkpoints", "log_every",
                  "eval_batch_size", "device", "num_processes"}


SAFE_MODEL_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_id(v: str | None) -> str | None:
    # The id names a folder under <db folder>/models that a retrain deletes recursively: no path tricks.
    if v is not None and not SAFE_MODEL_ID.fullmatch(v):
        raise ValueError(f"{v!r} is not a usable model id: use letters, digits, '.', '_' and '-' only, "
                         "starting with a letter or digit, and no '..'")
    return v


class AdapterOptions(BaseModel):
    """LoRA and gradient checkpointing: the same fields (and meaning) in every trainer's config
    (SFT and the reward model through ``TrainingConfig``, DPO and PPO directly)."""

    model_config = ConfigDict(extra="forbid")

    lora: bool = Field(False, description="Train LoRA adapters instead of every weight (merged into the saved model).")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | str = "all-linear"
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory).")


class TrainingConfig(AdapterOptions):
    """Fields every supervised trainer has. A trainer's config subclasses it, adds its data fields
    and may change a default (e.g. ``batch_size``)."""

    model_config = ConfigDict(extra="forbid")

    # --- what to train ---
    base_model: str = Field(DEFAULT_MODEL, description="Starting point: built-in name, store model id or HF folder.")
    model_id: str | None = Field(None, description="Id for the new model (default: <kind>-<hash of config and data>).")
    output_dir: str | None = Field(None, description="Model folder (default: <db folder>/models/<model id>).")

    @field_validator("model_id")
    @classmethod
    def _safe_model_id(cls, v: str | None) -> str | None:
        return check_model_id(v)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of prompts held out for validation.")
    max_length: int = Field(1024, ge=8, description="Tokens per sequence (prompt loses tokens first).")
    # --- optimisation ---
    lr: float | None = Field(None, gt=0, description="Peak learning rate (default 1e-5, or 2e-4 with LoRA).")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine decay ends at lr * this.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decay on matrices (not norms or biases).")
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm (None: no clipping).")
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps (overrides epochs; data repeats).")
    seed: int = 0
    # --- model (lora, lora_r, ..., gradient_checkpointing: AdapterOptions) ---
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, float32 elsewhere.")
    device: str | None = Field(None, description="cuda, cpu, ... (default: cuda if available).")
    num_processes: int = Field(1, ge=1, description="Processes under `accelerate launch` (data parallel; "
                                                    "the run file's stage launches them).")
    # --- bookkeeping ---
    eval_every: int = Field(50, ge=1, description="Steps between validation passes (and one at the end).")
    eval_batch_size: int = Field(8, ge=1)
    save_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=0, description="Checkpoints kept during training; all go once it ends.")
    log_every: int = Field(10, ge=1, description="Steps between writes of buffered metrics to the store.")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 1e-5)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained weights."""
        return {k: v for k, v in self.model_dump().items() if k not in RUNTIME_FIELDS} | {"lr": self.peak_lr}


# =============================================================================================
# Data: the prompt-level split
# =============================================================================================
class HasPrompt(Protocol):
    @property
    def prompt_id(self) -> str: ...


Item = TypeVar("Item", bound=HasPrompt)


def split_by_prompt(items: Sequence[Item], val_fraction: float, seed: int,
                    salt: str) -> tuple[list[Item], list[Item]]:
    """(train, validation). Prompts are ranked by ``hash(salt, seed, prompt_id)`` and the first
    ``val_fraction`` of them go to validation with all their items, so no prompt is on both sides;
    a prompt's side depends only on (salt, seed, prompt id, the number of prompts), never on row order."""
    prompt_ids = sorted({p.prompt_id for p in items}, key=lambda pid: content_hash(salt, seed, pid))
    n_val = round(val_fraction * len(prompt_ids))
    if val_fraction > 0 and len(prompt_ids) >= 2:
        n_val = min(max(n_val, 1), len(prompt_ids) - 1)  # at least one prompt on each side
    val_ids = set(prompt_ids[:n_val])
    return [p for p in items if p.prompt_id not in val_ids], [p for p in items if p.prompt_id in val_ids]


def data_order(n_train: int, per_step: int, cfg: TrainingConfig) -> tuple[list[int], int]:
    """(the stream of example indices, total optimizer steps).

    Epoch ``e`` is a permutation from a generator seeded with ``seed + e``; the stream is the epochs
    back to back. Step ``s`` takes ``stream[s * per_step : (s + 1) * per_step]`` (the last step of
    the stream may be shorter).
    """
    if cfg.max_steps:
        total_steps = cfg.max_steps
        epochs = math.ceil(total_steps * per_step / n_train)
    else:
        epochs = cfg.epochs
        total_steps = math.ceil(epochs * n_train / per_step)
    stream: list[int] = []
    for epoch in range(epochs):
        stream.extend(torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist())
    return stream[:total_steps * per_step], total_steps


# =============================================================================================
# Device, precision, optimizer, schedule
# =============================================================================================
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(cfg: TrainingConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def use_bf16(cfg: TrainingConfig, device: torch.device) -> bool:
    if cfg.mixed_precision == "no":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.mixed_precision == "bf16" and not supported and device.type != "cpu":
        raise ValueError(f"bf16 is not supported on {device}")
    # CPU bf16 autocast works but is slower than float32 on most CPUs: only when asked for.
    return supported or (cfg.mixed_precision == "bf16" and device.type == "cpu")


def autocast_for(cfg: TrainingConfig, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the forward passes' autocast context (bf16 or nothing)."""
    if use_bf16(cfg, device):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


LoadDtype = Literal["auto", "float32", "bfloat16"]


def load_dtype_for(name: LoadDtype, device: torch.device, *, trained: bool = False) -> torch.dtype:
    """The dtype weights are loaded in. ``auto``: bfloat16 on a CUDA device that supports it, float32
    elsewhere (CPU tests stay float32) and for weights AdamW updates in full (``trained``): a bf16
    weight cannot take a 1e-6 step (its precision is ~4e-3 relative), so full fine-tuning keeps
    float32 master weights unless ``bfloat16`` is asked for. Frozen weights (a reward model, the base
    under LoRA adapters) load in bf16 on such GPUs: half the memory. (DPO and PPO load a separate
    reference in the policy's dtype, so the two agree before training.)"""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    bf16_ok = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_ok and not trained else torch.float32


def add_lora(model: torch.nn.Module, opts: AdapterOptions, task_type: str | None) -> torch.nn.Module:
    """Wrap ``model`` in peft LoRA adapters (``task_type`` None: a bare backbone, e.g. a critic's);
    with gradient checkpointing the inputs must require grad, or the frozen base would cut the graph."""
    from peft import LoraConfig, get_peft_model

    if opts.gradient_checkpointing:
        model.enable_input_require_grads()
    config = LoraConfig(task_type=task_type, r=opts.lora_r, lora_alpha=opts.lora_alpha,
                        lora_dropout=opts.lora_dropout, target_modules=opts.lora_target_modules)
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass. transformers only does it while the
    model is in train mode; the RL trainers pair this with ``remove_dropout`` so train mode changes
    nothing else."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def remove_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout to p = 0 (LoRA's included): DPO and PPO compare log-probs of the same tokens
    across forward passes (old vs new policy, policy vs reference), which dropout would make noisy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # functional dropout in attention
            module.attention_dropout = 0.0
    return model


def make_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (embeddings and linear weights), as nanoGPT does.
    The fused kernel (CPU and CUDA) is ~10x faster than the default on CPU and just as deterministic."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type in ("cpu", "cuda"))


def lr_at(step: int, total_steps: int, cfg: TrainingConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    peak, floor = cfg.peak_lr, cfg.peak_lr * cfg.min_lr_ratio
    warmup = round(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup - 1, 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def clip_gradients(params: Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip to ``max_norm`` (when set) and return the global gradient norm before clipping."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))


# =============================================================================================
# Checkpoints
# =============================================================================================
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep: int) -> Path:
    """Write ``step-NNNNNN`` atomically (a temp folder renamed at the end); prune to the newest ``keep``."""
    final, tmp = ckpt_dir / f"step-{step:06d}", ckpt_dir / f".step-{step:06d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(trainable_state(model), tmp / "model.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "saved_at": str(now())}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    expect: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer and RNG; refuse a checkpoint written for other settings, data or
    data order (every ``*_hash`` key of ``expect`` must match)."""
    state = json.loads((path / "state.json").read_text())
    what = {"config_hash": "config", "train_ids_hash": "training data", "order_hash": "data order"}
    for key in sorted(k for k in expect if k.endswith("_hash")):
        if state.get(key) != expect[key]:
            raise RuntimeError(f"{path} was written for a different {what.get(key, key)} "
                               f"({state.get(key)} != {expect[key]}); choose another --model-id or --output-dir, "
                               "or delete that folder")
    weights = torch.load(path / "model.pt", weights_only=True)
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise RuntimeError(f"{path}: checkpoint lacks {sorted(missing)[:3]}...")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


# =============================================================================================
# Bookkeeping
# =============================================================================================
class MetricsBuffer:
    """Metrics rows kept in memory and written in batches (the store is opened per write)."""

    def __init__(self, store: Store, run_id: str, model_id: str):
        self.store, self.run_id, self.model_id = store, run_id, model_id
        self.rows: list[dict[str, Any]] = []

    def add(self, step: int, split: str, values: dict[str, float]) -> None:
        stamp = now()
        self.rows += [{"run_id": self.run_id, "model_id": self.model_id, "step": step, "split": split,
                       "name": k, "value": None if v is None or math.isnan(v) else float(v), "created_at": stamp}
                      for k, v in values.items()]

    def flush(self) -> None:
        if self.rows:
            self.store.insert("metrics", self.rows)
            self.rows = []


def check_same_training(out_dir: Path, meta: dict[str, Any], fingerprint: str, data_key: str,
                        snapshot: dict[str, Any]) -> None:
    """A finished model folder is reused only if it was trained from this config and this data (its
    fingerprint; folders from before fingerprints: the data hash). Otherwise: a clear error, nothing
    overwritten, because the folder's name (an explicit model id or output dir) is not its content."""
    stored = meta.get("fingerprint")
    same = stored == fingerprint if stored else meta.get("data_snapshot", {}).get(data_key) == snapshot.get(data_key)
    if not same:
        raise ValueError(f"{out_dir} holds a model trained from another config or other data; give another "
                         "--model-id / output_dir, or delete that folder to retrain it")


def model_folder(store: Store, cfg: TrainingConfig, model_id: str) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else store.path.parent / "models" / model_id


@contextmanager
def sigterm_as_interrupt():
    """Within this block a SIGTERM (``kill``, a scheduler's preemption) raises KeyboardInterrupt like
    Ctrl-C, so the run is marked 'interrupted' instead of being left 'running'. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# =============================================================================================
# Several processes (`accelerate launch` / torchrun): data parallel with one writer
# =============================================================================================
# Each process takes every world-th example of an optimizer step's batch, gradients are summed
# across processes (one all-reduce per step: what DDP does, without its per-micro-batch syncs)
# and every process applies the same update, so N processes with the same global batch follow
# the single-process loss curve. Only rank 0 touches the store and writes checkpoints and models.
T = TypeVar("T")


class Dist:
    def __init__(self) -> None:
        import os

        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, cfg: TrainingConfig) -> torch.device:
        return self.device_for(cfg.device)

    def device_for(self, requested: str | None) -> torch.device:
        """``requested`` (None or "auto": cuda if available), one GPU per process when several run."""
        auto = requested in (None, "auto")
        if self.active and torch.cuda.is_available() and auto:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else requested)

    def mine(self, items: list[T]) -> list[T]:
        """This process's share of one step's examples."""
        return items[self.rank::self.world] if self.active else items

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        if not self.active:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n

    def _reduce_device(self) -> torch.device:
        """Where a statistic goes to be all-reduced: NCCL only reduces CUDA tensors, gloo CPU ones."""
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def sum(self, value: float) -> float:
        return self.sum_values({"value": value})["value"]

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Each key summed over the processes (one all-reduce)."""
        if not self.active or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (reduced in float64, returned in ``t``'s dtype and device)."""
        if not self.active:
            return t
        import torch.distributed as dist

        out = t.detach().to(self._reduce_device(), torch.float64)
        dist.all_reduce(out)
        return out.to(t.device, t.dtype)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


class NoMetrics(MetricsBuffer):
    """What ranks other than 0 log: nothing."""

    def __init__(self) -> None:
        self.rows = []

    def add(self, step: int, split: str, values: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass


def accelerate_command(num_processes: int, argv: Sequence[str]) -> list[str]:
    """``accelerate launch`` of ``python -m cai.cli ARGV`` on ``num_processes`` processes (DDP; on a
    machine without GPUs torchrun starts CPU processes that talk over gloo)."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "cai.cli", *argv]
