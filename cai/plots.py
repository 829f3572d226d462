"""PNG plots of what the store holds (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from cai.store import Store

# The curves worth a glance for a PPO run; other runs plot whatever metrics they logged.
PPO_METRICS = ("reward", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clip_frac", "approx_kl",
               "explained_variance", "response_length", "tokens_per_second", "step_seconds")


def plot_training_curves(store: Store, run_id: str, out: str | Path, metrics: Sequence[str] | None = None,
                         title: str | None = None) -> Path:
    """One panel per metric of ``run_id`` (train and test splits as separate lines); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = store.query("SELECT step, split, name, value FROM metrics WHERE run_id = ? AND value IS NOT NULL "
                       "ORDER BY name, split, step", [run_id])
    if not rows:
        raise LookupError(f"no metrics for run {run_id!r} in {store.path}")
    present = list(dict.fromkeys(r["name"] for r in rows))
    if metrics is None:
        metrics = [m for m in PPO_METRICS if m in present] or present
    names = [m for m in metrics if m in present][:16]
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for split in ("train", "test"):
            pts = [(r["step"], r["value"]) for r in rows if r["name"] == name and r["split"] == split]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if split == "test" or len(pts) < 30 else None, ms=3,
                        label=f"{split} (held out)" if split == "test" else split)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if name == "reward":
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title or f"training curves: {run_id}", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
