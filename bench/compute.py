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
