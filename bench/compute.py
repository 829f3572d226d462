"""Every bench's "share of the machine's compute limit": estimated FLOPs of the work done divided by
(seconds x measured matmul peak), so figures compare across machines. The peak is measured here, in
the same process, with one large square matmul in bf16 on a GPU (fp32 on a CPU, where bf16 matmul is
emulated and slower): an upper bound no real workload reaches, so 5-50 % is normal for inference.

    from compute import matmul_peak, forward_flops, print_share
"""

from __future__ import annotations

import time


def matmul_peak(device: str | None = None, n: int = 1024, seconds: float = 1.0) -> tuple[float, str]:
    """(FLOP/s of a square ``n``x``n`` matmul, dtype name) on ``device`` (default: cuda if present)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if device.startswith("cuda"):
        n = max(n, 8192)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0), str(dtype).replace("torch.", "")


def n_params(model_dir: str) -> int:
    """Parameters of a transformers model folder (from its safetensors headers; nothing is loaded)."""
    import json
    import struct
    from pathlib import Path

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                total += count
    return total


def forward_flops(params: int, tokens: int) -> float:
    """Forward-pass FLOPs of ``tokens`` tokens through a ``params``-parameter decoder (2 per weight)."""
    return 2.0 * params * tokens


def print_share(label: str, flops: float, seconds: float, peak: tuple[float, str] | None = None) -> float:
    """Print (and return) ``flops / (seconds * peak)`` as a percentage of the machine's compute limit."""
    peak = peak or matmul_peak()
    share = flops / (seconds * peak[0]) if seconds > 0 else float("nan")
    print(f"{label}: {flops / 1e9:.2f} GFLOP in {seconds:.2f} s = {flops / seconds / 1e9:.2f} GFLOP/s; "
          f"{100 * share:.2f} % of the measured {peak[1]} matmul peak ({peak[0] / 1e9:.1f} GFLOP/s)")
    return share


def train_flops(params: int, tokens: int) -> float:
    """Training FLOPs of ``tokens`` tokens (forward + backward: 6 per weight per token)."""
    return 6.0 * params * tokens


def model_params(name: str) -> int:
    """Parameters of a model given by built-in name, store-free path or HF folder (0 when unknown)."""
    from pathlib import Path

    path = name
    if not Path(name).is_dir():
        try:
            from cai.models import resolve

            path = resolve(name)
        except Exception:  # noqa: BLE001 - a served model has no local weights: no estimate
            return 0
    return n_params(path)


class EngineTokens:
    """Counts the tokens every engine processes while active (``with EngineTokens() as t:``): the
    prompt tokens of each request (prefilled once, however many samples) plus each generated token,
    and the prompt + continuation tokens of scoring calls, per model. It wraps the public methods of
    ``cai.engines.base.Engine``, so every engine and every stage is counted the same way; prompts are
    kept and tokenised only when asked (``flops``), so the counting costs the timed work nothing."""

    def __init__(self) -> None:
        self.generated: dict[str, int] = {}
        self._prompts: dict[str, list[tuple[object, list[str]]]] = {}

    def _add(self, engine, prompts) -> None:
        self._prompts.setdefault(engine.model, []).append((engine.tokenizer, list(prompts)))

    def __enter__(self) -> EngineTokens:
        from cai.engines.base import Engine

        self._saved = {k: getattr(Engine, k) for k in ("generate", "score_next_token", "score_continuations")}
        gen, nxt, cont = (self._saved[k] for k in ("generate", "score_next_token", "score_continuations"))
        counter = self

        def generate(engine, prompts, params):
            out = gen(engine, prompts, params)
            counter._add(engine, prompts)
            samples = [c[:1] for c in out] if params.greedy else out  # greedy copies are decoded once
            counter.generated[engine.model] = counter.generated.get(engine.model, 0) + sum(
                x.num_tokens for c in samples for x in c)
            return out

        def score_next_token(engine, prompts, candidates, top_k=20):
            counter._add(engine, prompts)
            return nxt(engine, prompts, candidates, top_k)

        def score_continuations(engine, prompts, continuations):
            counter._add(engine, [p + (c or "") for p, c in zip(prompts, continuations, strict=True)])
            return cont(engine, prompts, continuations)

        Engine.generate, Engine.score_next_token, Engine.score_continuations = generate, score_next_token, \
            score_continuations
        return self

    def __exit__(self, *exc: object) -> None:
        from cai.engines.base import Engine

        for k, v in self._saved.items():
            setattr(Engine, k, v)

    def tokens(self) -> dict[str, int]:
        """Tokens processed per model (prompt + generated)."""
        out = dict(self.generated)
        for model, batches in self._prompts.items():
            for tok, prompts in batches:
                ids = tok(prompts, add_special_tokens=False)["input_ids"] if prompts else []
                out[model] = out.get(model, 0) + sum(len(x) for x in ids)
        return out

    def flops(self) -> float:
        """Inference FLOPs of everything counted: 2 x parameters x tokens, per model."""
        return sum(forward_flops(model_params(m), t) for m, t in self.tokens().items())

    def reset(self) -> None:
        self.generated.clear()
        self._prompts.clear()
