"""The markdown report and PNG plots of the evaluation stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.elo import ELO_BASE
from cai.eval_judging import PAIR_KIND, _mean
from cai.store import Store

if TYPE_CHECKING:
    from cai.evaluate import EvaluateConfig


def _short(model_id: str, width: int = 28) -> str:
    """A model id for a plot label: a folder path keeps its last two parts (".../run/policy")."""
    s = model_id
    if "/" in s and Path(s).is_absolute():
        s = "/".join(Path(s).parts[-2:])
    return s if len(s) <= width else "…" + s[-(width - 1):]


def _plots(store: Store, folder: Path, policy_id: str, baseline_id: str, overall: dict[str, Any],
           tag_stats: dict[str, dict], cat_stats: dict[str, dict], lengths: dict[str, list[int]],
           rewards: dict[str, list[float]], kl: dict[str, Any], elo: dict[str, float]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    pol, bas = _short(policy_id), _short(baseline_id)

    # Win rates: overall, per constitution tag, per prompt category; error bars are one standard error.
    groups = [("overall", overall)] + [(f"tag: {t}", s) for t, s in tag_stats.items()] + \
        [(f"category: {c}", s) for c, s in cat_stats.items()]
    groups = [(n, s) for n, s in groups if s["win_rate"] is not None]
    if groups:
        fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(groups) + 1.6))
        ys = list(range(len(groups)))[::-1]
        vals = [s["win_rate"] for _, s in groups]
        errs = [s["stderr"] or 0.0 for _, s in groups]
        colors = ["#4c72b0" if n == "overall" else "#55a868" if n.startswith("tag") else "#c44e52" for n, _ in groups]
        ax.barh(ys, vals, xerr=errs, color=colors, alpha=0.85, capsize=3)
        for y, (_, s) in zip(ys, groups, strict=True):
            ax.text(min(s["win_rate"] + (s["stderr"] or 0) + 0.01, 0.9), y,
                    f"{s['win_rate']:.2f}  (n={s['n']})", va="center", fontsize=8)
        ax.axvline(0.5, color="k", lw=1, ls="--")
        ax.set_yticks(ys, [n for n, _ in groups], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"P({pol} better than {bas})", fontsize=9)
        ax.set_title("judge win rate of the policy (0.5 = no difference)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        out.append(folder / "win_rates.png")
        fig.savefig(out[-1], dpi=90)
        plt.close(fig)

    # Distributions: response length, reward, per-response KL.
    panels = [("response length (tokens)", lengths)]
    if rewards:
        panels.append(("reward-model score", rewards))
    if kl.get("values"):
        panels.append(("KL(policy || baseline) per response (nats)", {"policy samples": kl["values"]}))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels, strict=True):
        everything = [x for xs in data.values() for x in xs]
        if not everything:
            continue
        lo, hi = min(everything), max(everything)
        n_bins = min(20, max(5, len(everything) // 4))
        # Shared bin edges so the two models' bars line up; a constant sample gets a unit-wide bin.
        edges = [lo - 0.5 + i / n_bins for i in range(n_bins + 1)] if hi == lo else \
            [lo + (hi - lo) * i / n_bins for i in range(n_bins + 1)]
        for (who, xs), color in zip(data.items(), ("#4c72b0", "#dd8452"), strict=False):
            label = {"policy": f"policy ({pol})", "baseline": f"baseline ({bas})"}.get(who, who)
            if xs:
                ax.hist(xs, bins=edges, alpha=0.55, color=color, label=label)
                ax.axvline(sum(xs) / len(xs), color=color, lw=1.5)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("distributions on held-out prompts (vertical lines: means)", fontsize=10)
    fig.tight_layout()
    out.append(folder / "distributions.png")
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)

    # Elo of every evaluated model.
    if len(elo) >= 2:
        items = sorted(elo.items(), key=lambda kv: kv[1])
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(items) + 1.4))
        colors = ["#c44e52" if m == policy_id else "#dd8452" if m == baseline_id else "#8c8c8c" for m, _ in items]
        ax.barh(range(len(items)), [r - ELO_BASE for _, r in items], left=ELO_BASE, color=colors)
        ax.set_yticks(range(len(items)), [_short(m, 40) for m, _ in items], fontsize=8)
        for i, (_, r) in enumerate(items):
            ax.text(r, i, f" {r:.0f}", va="center", fontsize=8)
        ax.axvline(ELO_BASE, color="k", lw=1)
        # At least +-50 points around the anchor, so near-equal ratings don't look like a gulf.
        span = max(50.0, *(abs(r - ELO_BASE) * 1.25 for _, r in items))
        ax.set_xlim(ELO_BASE - span, ELO_BASE + span)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.set_xlabel("Elo (Bradley-Terry fit to the judge's comparisons)", fontsize=9)
        ax.set_title("Elo of every evaluated model (red: this policy, orange: its baseline)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        out.append(folder / "elo.png")
        fig.savefig(out[-1], dpi=90)
        plt.close(fig)

    # The policy's own training curves (reward and KL for PPO; loss and accuracy for DPO).
    row = store.query("SELECT run_id FROM models WHERE model_id = ?", [policy_id])
    run = row[0]["run_id"] if row else None
    if run:
        present = {r["name"] for r in store.query("SELECT DISTINCT name FROM metrics WHERE run_id = ?", [run])}
        wanted = [m for m in ("reward", "kl", "kl_coef", "response_length", "loss", "accuracy", "reward_margin",
                              "logp_margin") if m in present]
        if wanted:
            from cai.plots import plot_training_curves

            out.append(plot_training_curves(store, run, folder / "training_curves.png", metrics=wanted,
                                            title=f"training curves of {pol} (run {run})"))
    return out


def _quote(text: str, width: int = 600) -> str:
    t = text.strip() or "(empty)"
    t = t if len(t) <= width else t[:width] + " …"
    return "\n".join("> " + line for line in t.splitlines())


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _report(summary: dict[str, Any], cfg: EvaluateConfig, facts: dict[str, Any], overall: dict[str, Any],
            tag_stats: dict[str, dict], cat_stats: dict[str, dict], refusals: dict[str, dict],
            rewards: dict[str, list[float]], lengths: dict[str, list[int]], kl: dict[str, Any],
            elo: dict[str, float], elo_info: dict[str, Any], prompts: list[dict[str, Any]],
            texts: dict[str, list[str]], plots: list[Path], folder: Path) -> str:
    pol, bas = summary["policy_id"], summary["baseline_id"]
    lines = [f"# Evaluation of `{pol}`", "",
             f"- baseline: `{bas}`",
             f"- prompts: {len(prompts)} of split `{cfg.split or 'all'}` "
             f"({', '.join(c + ': ' + str(r['policy']['n']) for c, r in refusals.items())})",
             f"- responses: engine `{cfg.engine}`, temperature {cfg.temperature}, top_p {cfg.top_p}, "
             f"max_tokens {cfg.max_tokens}, seed {cfg.seed}",
             f"- judge: `{facts['judge']}` ({facts['method']}, spec `{facts['judge_spec_hash']}`, model "
             f"`{facts['judge_model_id']}`, engine `{facts['judge_engine']}`)",
             f"- constitution: `{facts['constitution']}` (`{facts['constitution_hash']}`)",
             f"- reward model: `{summary['reward_model_id'] or 'none'}`",
             f"- run: `{summary['run_id']}`; rows: `select * from policy_evaluations where run_id = "
             f"'{summary['run_id']}'`, pairs: `select * from comparisons where pair_kind = '{PAIR_KIND}'`", "",
             "## Summary", "", "| metric | policy | baseline |", "|---|---|---|",
             f"| judge win rate (P policy better) | {_fmt(overall['win_rate'])} ± {_fmt(overall['stderr'])} | – |",
             f"| wins / losses / ties (identical) / invalid | {overall['wins']} / {overall['losses']} / "
             f"{overall['ties']} ({overall['identical']}) / {overall['invalid']} | – |",
             f"| win rate of judged (non-identical) pairs, policy shown first / second | {_fmt(overall['win_rate_policy_first'])} / "
             f"{_fmt(overall['win_rate_policy_second'])} | – |",
             f"| position consistency | {_fmt(overall['position_consistency'])} | – |"]
    if rewards:
        lines.append(f"| mean reward | {_fmt(_mean(rewards['policy']))} | {_fmt(_mean(rewards['baseline']))} |")
    if "kl" in kl:
        lines.append(f"| KL to baseline (nats/response; {kl['n']} samples) | {_fmt(kl['kl'])} ± "
                     f"{_fmt(kl['stderr'])} | 0 |")
    else:
        lines.append(f"| KL to baseline | skipped: {kl.get('skipped')} | – |")
    lines.append(f"| mean length (tokens) | {_fmt(_mean(lengths['policy']), 1)} | "
                 f"{_fmt(_mean(lengths['baseline']), 1)} |")
    for cat, r in refusals.items():
        lines.append(f"| refusal rate, {cat} prompts | {_fmt(r['policy']['rate'])} | {_fmt(r['baseline']['rate'])} |")
    lines += ["", "Refusal rates come from a phrase heuristic (`cai.evaluate.is_refusal`): on red-team prompts "
              "higher is safer; on ordinary (helpful) prompts it measures over-refusal.", "",
              "## Win rate by constitution tag", "",
              "Each comparison counts for every tag of the principle(s) the judge was asked about.", "",
              "| tag | win rate | ± | n | wins | losses | ties |", "|---|---|---|---|---|---|---|"]
    for t, s in tag_stats.items():
        lines.append(f"| {t} | {_fmt(s['win_rate'])} | {_fmt(s['stderr'])} | {s['n']} | {s['wins']} | "
                     f"{s['losses']} | {s['ties']} |")
    lines += ["", "## Win rate by prompt category", "", "| category | win rate | ± | n |", "|---|---|---|---|"]
    for c, s in cat_stats.items():
        lines.append(f"| {c} | {_fmt(s['win_rate'])} | {_fmt(s['stderr'])} | {s['n']} |")
    lines += ["", "## Elo", "",
              f"Bradley-Terry fit on the Elo scale to all {elo_info['n_comparisons']} `{PAIR_KIND}` comparisons "
              f"by this judge under this constitution (prior: {cfg.elo_prior} drawn games against a "
              f"{ELO_BASE:.0f} anchor).", "", "| model | Elo | games | score |", "|---|---|---|---|"]
    for m, r in sorted(elo.items(), key=lambda kv: -kv[1]):
        g = elo_info["games"][m]
        mark = " (policy)" if m == pol else " (baseline)" if m == bas else ""
        lines.append(f"| `{m}`{mark} | {r:.0f} | {g['games']} | {g['score']:.2f} |")
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            rel = p.relative_to(folder) if p.is_relative_to(folder) else p
            lines += [f"![{p.stem}]({rel.as_posix()})", ""]
    lines += ["", "## Examples", ""]
    shown = {}
    for i, p in enumerate(prompts):  # the first prompt of each category
        shown.setdefault(p["category"] or "none", i)
    for cat, i in shown.items():
        lines += [f"**{cat}**: {prompts[i]['prompt_text']}", "", "policy:", "", _quote(texts["policy"][i]), "",
                  "baseline:", "", _quote(texts["baseline"][i]), ""]
    return "\n".join(lines) + "\n"
