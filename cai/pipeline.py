"""The run file (``pipeline.yaml``): which stages to run, on what, with which settings.

``cai run pipeline.yaml`` and the Prefect flow ``cai_pipeline`` take the same file. It is validated
by pydantic with file:line errors like every spec file. Each stage has its own section, which is
that stage's own config model (the one its CLI builds), so a run file can set anything the stage's
CLI can, and a typo in any section is reported before the first stage starts.

Sections inherit the top-level ``policy``, ``engine``, ``engine_options``, ``seed``,
``constitution`` and ``judge`` unless they set their own. Models flow from stage to stage: PPO and
DPO start from the SFT model when ``sft`` is one of the stages, PPO is rewarded by the reward model
``train_rm`` trained, and ``evaluate`` judges the policy PPO (or DPO) produced, unless a section
names its model explicitly. A stage that is in the file but left out of this run (``--stages``)
hands over the newest model that stage wrote to the store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.critique import CritiqueConfig
from cai.distributed import RunnerConfig
from cai.dpo import DPOConfig
from cai.evaluate import EvaluateConfig
from cai.generate import GenerateConfig
from cai.label import LabelConfig
from cai.models import DEFAULT_MODEL
from cai.ppo import PPOConfig
from cai.reward import RewardConfig
from cai.sft import SFTConfig
from cai.yamlio import Problem, SpecError, validate_file

Stage = Literal["ingest", "generate", "critique", "sft", "label", "train_rm", "ppo", "dpo", "evaluate"]
STAGE_ORDER: list[str] = ["ingest", "generate", "critique", "sft", "label", "train_rm", "ppo", "dpo", "evaluate"]
TRAINING_STAGES = {"sft", "train_rm", "ppo", "dpo"}

# Which top-level keys each section inherits, and under which name the section calls them.
_INHERIT: dict[str, dict[str, str | tuple[str, ...]]] = {
    "generate": {"policy": "model", "engine": "engine", "engine_options": "engine_options", "seed": "seed"},
    "critique": {"policy": "model", "engine": "engine", "engine_options": "engine_options", "seed": "seed",
                 "constitution": "constitution"},
    "sft": {"policy": "base_model", "seed": "seed"},
    "label": {"engine": "engine", "engine_options": "engine_options", "seed": "seed", "constitution": "constitution",
              "judge": "judge"},
    "train_rm": {"policy": "base_model", "seed": "seed"},
    "ppo": {"policy": "policy", "seed": "seed"},
    "dpo": {"policy": "policy", "seed": "seed"},
    "evaluate": {"engine": ("engine", "judge_engine"), "engine_options": ("engine_options", "judge_engine_options"),
                 "seed": "seed", "constitution": "constitution", "judge": "judge"},
}
# Fields a stage takes from an earlier stage's model when the run file does not set them.
_HANDOFF: dict[str, dict[str, tuple[str, ...]]] = {
    "ppo": {"policy": ("sft",), "reward": ("train_rm",)},
    "dpo": {"policy": ("sft",)},
    "evaluate": {"policy": ("ppo", "dpo"), "reward_model": ("train_rm",)},
}


class IngestSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: list[str] = Field(default_factory=lambda: ["data/prompts/red_team.jsonl", "data/prompts/helpful.jsonl"])
    skip_invalid: bool = False
    test_fraction: float = Field(0.1, ge=0, lt=1)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "cai"
    db: str | None = Field(None, description="DuckDB file; default $CAI_DB or data/cai.duckdb.")
    constitution: str = "constitutions/harmless.yaml"
    judge: str = "judges/multiple-choice.yaml"
    policy: str = Field(DEFAULT_MODEL, description="Starting policy model.")
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    stages: list[Stage] = Field(default_factory=lambda: ["ingest", "generate"])
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="kind: ray fans shardable stages out.")

    ingest: IngestSection = Field(default_factory=IngestSection)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    train_rm: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    # Filled from the file, not written by people: the keys each section set itself (handoffs
    # never override those).
    explicit: dict[str, list[str]] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _inherit_top_level(cls, data: Any) -> Any:
        """Stage sections inherit the top-level settings unless they set their own."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        explicit: dict[str, list[str]] = {}
        for section, mapping in _INHERIT.items():
            raw = data.get(section)
            if raw is not None and not isinstance(raw, dict):
                continue  # pydantic reports the wrong type with its line
            sec = dict(raw or {})
            explicit[section] = sorted(sec)
            for top, keys in mapping.items():
                for key in (keys,) if isinstance(keys, str) else keys:
                    if top in data:
                        sec.setdefault(key, data[top])
                    elif top == "policy":
                        sec.setdefault(key, DEFAULT_MODEL)
            data[section] = sec
        data["explicit"] = explicit
        return data

    @model_validator(mode="after")
    def _stages_in_order(self) -> PipelineConfig:
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("a stage is listed twice")
        return self

    def ordered_stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if s in self.stages]


def load_pipeline(path: str | Path) -> PipelineConfig:
    cfg, lines = validate_file(PipelineConfig, path)
    problems = []
    for i, f in enumerate(cfg.ingest.files if "ingest" in cfg.stages else []):
        if not Path(f).exists():
            problems.append(Problem(str(path), lines.get(("ingest", "files", i)), f"ingest.files[{i}]",
                                    f"no such file {f!r} (paths are relative to where you run cai)"))
    if "ppo" in cfg.stages and "dpo" in cfg.stages:
        problems.append(Problem(str(path), lines.get(("stages",)), "stages",
                                "list ppo or dpo, not both: each fine-tunes the policy and evaluate judges one"))
    if problems:
        raise SpecError(problems)
    return cfg


# ---- running stages ---------------------------------------------------------------------------
# Errors a retry cannot fix: a bad setting, a missing file or model, a module that is not there.
# Prefect retries a stage only for the others (a locked store, a dropped connection, a crashed engine).
CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes pydantic's ValidationError and SpecError
    TypeError, LookupError,  # includes ModelNotFoundError and KeyError
    FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ImportError, NotImplementedError)


class StageFailed(RuntimeError):
    """A stage of a pipeline run failed: names the stage and the cause in one line."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage, self.cause = stage, cause
        text = str(cause).strip().splitlines()
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {text[0] if text else repr(cause)}")

    @property
    def retryable(self) -> bool:
        return not isinstance(self.cause, CONFIG_ERRORS)


def newest_model_of_stage(store: Any, stage: str) -> str | None:
    """The newest model a stage (``sft``, ``train_rm``, ``ppo``, ``dpo``) registered in the store."""
    kind = "reward" if stage == "train_rm" else "policy"
    prefix = {"sft": "sft", "train_rm": "rm", "ppo": "ppo", "dpo": "dpo"}[stage]
    if not store.path.exists():
        return None
    rows = store.query("SELECT model_id FROM models WHERE kind = ? AND model_id LIKE ? "
                       "ORDER BY created_at DESC LIMIT 1", [kind, f"{prefix}-%"])
    return rows[0]["model_id"] if rows else None


def resolve_handoffs(stage: str, cfg: PipelineConfig, store: Any, produced: dict[str, str]) -> dict[str, Any]:
    """Fields of ``stage``'s config that come from models earlier stages made."""
    updates: dict[str, Any] = {}
    for field, sources in _HANDOFF.get(stage, {}).items():
        if field in cfg.explicit.get(stage, []):
            continue
        for source in sources:
            if source not in cfg.stages:
                continue
            model = produced.get(source) or newest_model_of_stage(store, source)
            if model:
                updates[field] = model
                break
    return updates


def stage_config(stage: str, cfg: PipelineConfig, store: Any, produced: dict[str, str]) -> BaseModel:
    section = getattr(cfg, stage)
    updates = resolve_handoffs(stage, cfg, store, produced)
    return section.model_copy(update=updates) if updates else section


def launch_training(stage: str, section: BaseModel, store: Any) -> None:
    """Train ``stage`` on ``section.num_processes`` processes under `accelerate launch` (the same
    `cai sft` / `cai train-rm` / `cai dpo` / `cai ppo` command with this section as its --config); rank 0 writes the store."""
    import subprocess
    import tempfile

    import yaml

    from cai.training import accelerate_command

    command = {"sft": "sft", "train_rm": "train-rm", "dpo": "dpo", "ppo": "ppo"}.get(stage)
    if command is None:
        raise ValueError(f"{stage}: num_processes > 1 is supported for sft, train_rm, dpo and ppo")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(section.model_dump(mode="json")))
        argv = [command, "--db", str(store.path), "--config", str(path)]
        result = subprocess.run(accelerate_command(section.num_processes, argv))
    if result.returncode:
        raise RuntimeError(f"{stage} under accelerate launch ({section.num_processes} processes) exited "
                           f"{result.returncode}; its run row in the store says where it stopped")


def run_stage(stage: str, cfg: PipelineConfig, store: Any, produced: dict[str, str] | None = None,
              *, progress: bool = False) -> dict[str, Any]:
    """Run one stage of a pipeline against the store; the same functions the CLI calls.

    ``produced`` maps stage name to the model id that stage made in this run; training stages
    add theirs to it.
    """
    produced = produced if produced is not None else {}
    started = time.time()
    if stage == "ingest":
        from cai.ingest import ingest_file

        out: dict[str, Any] = {"files": {}, "inserted": 0, "skipped": 0}
        for f in cfg.ingest.files:
            r = ingest_file(store, f, skip_invalid=cfg.ingest.skip_invalid, test_fraction=cfg.ingest.test_fraction)
            out["files"][f] = {"read": r.read, "inserted": r.inserted, "skipped": len(r.skipped)}
            out["inserted"] += r.inserted
            out["skipped"] += len(r.skipped)
        out["seconds"] = round(time.time() - started, 2)
        return out
    section = stage_config(stage, cfg, store, produced)
    if stage in TRAINING_STAGES:
        from cai.engines import clear_engines

        clear_engines()  # a cached vLLM engine holds most of a GPU: free it before training
        if getattr(section, "num_processes", 1) > 1:
            launch_training(stage, section, store)  # trains under accelerate; below finds it trained
    if stage == "generate":
        from cai.generate import run_generate

        summary = run_generate(store, section, progress=progress)
    elif stage == "critique":
        from cai.critique import run_critique

        summary = run_critique(store, section, progress=progress)
    elif stage == "sft":
        from cai.sft import run_sft

        summary = run_sft(store, section, progress=progress)
    elif stage == "label":
        from cai.label import run_label

        summary = run_label(store, section, progress=progress)
    elif stage == "train_rm":
        from cai.reward import train_reward

        summary = train_reward(store, section, progress=progress)
    elif stage == "ppo":
        from cai.ppo import run_ppo

        if section.reward is None:
            raise ValueError("the ppo stage needs a reward model: add train_rm to the stages, or set ppo.reward "
                             "(a reward model id or folder, judge:SPEC, or python:module:function)")
        summary = run_ppo(store, section, progress=progress)
    elif stage == "dpo":
        from cai.dpo import run_dpo

        summary = run_dpo(store, section, progress=progress)
    elif stage == "evaluate":
        from cai.evaluate import run_evaluate

        summary = run_evaluate(store, section, progress=progress)
    else:  # pragma: no cover - Stage is a Literal
        raise ValueError(f"unknown stage {stage!r}")
    summary = dict(summary)
    if stage in TRAINING_STAGES and summary.get("model_id"):
        produced[stage] = summary["model_id"]
    summary.setdefault("seconds", round(time.time() - started, 2))
    return summary


# ---- `cai run --check`: everything a run needs, before it starts ----------------------------------
def check_pipeline(cfg: PipelineConfig, stages: list[str] | None = None) -> list[str]:
    """Problems that would stop the run partway, found without loading a model or writing anything:
    constitution and judge specs valid, models present (or a store id), engines importable, and the
    store, model and report folders writable. An empty list: the run can start."""
    import importlib.util

    from cai.constitution import load_constitution, resolve_constitution
    from cai.judge_spec import load_judge_spec, resolve_judge_spec
    from cai.models import resolve
    from cai.store import default_db_path

    todo = [s for s in cfg.ordered_stages() if stages is None or s in stages]
    problems: list[str] = []
    db = Path(cfg.db) if cfg.db else default_db_path()
    store_ids = _store_model_ids(db)

    def check_model(stage: str, field: str, name: str | None) -> None:
        if not name or name in store_ids or name.startswith(("judge:", "python:")):
            return
        if field in resolve_handoffs_fields(stage, cfg):
            return  # an earlier stage of this run makes it
        try:
            resolve(name)
        except Exception as e:  # noqa: BLE001 - ModelNotFoundError and friends: report, keep checking
            problems.append(f"{stage}.{field}: {e}")

    def check_spec(stage: str, kind: str, name: str) -> None:
        try:
            if kind == "constitution":
                load_constitution(resolve_constitution(name))
            else:
                load_judge_spec(resolve_judge_spec(name))
        except Exception as e:  # noqa: BLE001 - SpecError lists file:line problems
            problems.append(f"{stage}.{kind}: {e}")

    engines: set[str] = set()
    for stage in todo:
        if stage == "ingest":
            continue
        section = getattr(cfg, stage)
        for field in ("model", "base_model", "policy", "ref", "value_model", "reward", "baseline",
                      "reward_model", "judge_model"):
            check_model(stage, field, getattr(section, field, None))
        if hasattr(section, "constitution"):
            check_spec(stage, "constitution", section.constitution)
        if hasattr(section, "judge"):
            check_spec(stage, "judge", section.judge)
            if problems and problems[-1].startswith(f"{stage}.judge:"):
                continue
            spec = load_judge_spec(resolve_judge_spec(section.judge))
            if not (getattr(section, "model", None) or getattr(section, "judge_model", None)):
                check_model(stage, "judge model", spec.model)
            engines.add(getattr(section, "engine", None) or getattr(section, "judge_engine", None) or spec.engine)
        for field in ("engine", "rollout_engine", "judge_engine"):
            if getattr(section, field, None):
                engines.add(getattr(section, field))
    for engine in sorted(e for e in engines if e):
        module = {"vllm": "vllm", "transformers": "transformers", "openai": "httpx"}.get(engine)
        if module and importlib.util.find_spec(module) is None:
            problems.append(f"engine {engine!r} is not importable here (no module {module!r}); install it or "
                            "choose another engine")
    writable = {"the store folder": db.parent}
    if TRAINING_STAGES & set(todo):
        writable["the models folder"] = db.parent / "models"
    if "evaluate" in todo:
        writable["the report folder"] = Path(cfg.evaluate.report_dir) if cfg.evaluate.report_dir \
            else db.parent / "reports"
    for what, folder in writable.items():
        if not _can_create(folder):
            problems.append(f"{what} {folder} is not writable (or cannot be created)")
    return problems


def resolve_handoffs_fields(stage: str, cfg: PipelineConfig) -> set[str]:
    """Fields of ``stage`` that an earlier stage in the run file fills with the model it trains."""
    return {field for field, sources in _HANDOFF.get(stage, {}).items()
            if field not in cfg.explicit.get(stage, []) and any(s in cfg.stages for s in sources)}


def _store_model_ids(db: Path) -> set[str]:
    if not db.exists():
        return set()
    from cai.store import Store

    try:
        # a short wait: a stage writing the store right now must not hold up a check
        return {r["model_id"] for r in Store(db, lock_timeout=2.0).query("SELECT model_id FROM models")}
    except Exception:  # noqa: BLE001 - a locked or old store: the run itself will say
        return set()


def _can_create(folder: Path) -> bool:
    """Whether ``folder`` exists and is writable, or its nearest existing parent is (without creating it)."""
    import os

    p = folder.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)
