"""The run file (``pipeline.yaml``): which stages to run, on what, with which settings.

``cai run pipeline.yaml`` and the Prefect flow ``cai_pipeline`` take the same file. It is validated
by pydantic with file:line errors like every spec file. Each stage has its own section, which is
that stage's config model, so a run file can set anything the stage's CLI can.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.generate import GenerateConfig
from cai.models import DEFAULT_MODEL
from cai.yamlio import Problem, SpecError, validate_file

Stage = Literal["ingest", "generate", "critique", "sft", "label", "train_rm", "ppo", "dpo", "evaluate"]
STAGE_ORDER: list[str] = ["ingest", "generate", "critique", "sft", "label", "train_rm", "ppo", "dpo", "evaluate"]


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

    ingest: IngestSection = Field(default_factory=IngestSection)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    # Sections of later stages are validated by their own config models when they run.
    critique: dict[str, Any] = Field(default_factory=dict)
    sft: dict[str, Any] = Field(default_factory=dict)
    label: dict[str, Any] = Field(default_factory=dict)
    train_rm: dict[str, Any] = Field(default_factory=dict)
    ppo: dict[str, Any] = Field(default_factory=dict)
    dpo: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _inherit_top_level(cls, data: Any) -> Any:
        """Stage sections inherit the top-level policy, engine and seed unless they set their own."""
        if not isinstance(data, dict):
            return data
        gen = data.get("generate")
        if gen is None or isinstance(gen, dict):
            gen = dict(gen or {})
            gen.setdefault("model", data.get("policy", DEFAULT_MODEL))
            for key in ("engine", "engine_options", "seed"):
                if key in data:
                    gen.setdefault(key, data[key])
            data = {**data, "generate": gen}
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
    if problems:
        raise SpecError(problems)
    return cfg


def run_stage(stage: str, cfg: PipelineConfig, store: Any) -> dict[str, Any]:
    """Run one stage of a pipeline against the store; the same functions the CLI calls."""
    if stage == "ingest":
        from cai.ingest import ingest_file

        out: dict[str, Any] = {"files": {}, "inserted": 0}
        for f in cfg.ingest.files:
            r = ingest_file(store, f, skip_invalid=cfg.ingest.skip_invalid, test_fraction=cfg.ingest.test_fraction)
            out["files"][f] = {"read": r.read, "inserted": r.inserted, "skipped": len(r.skipped)}
            out["inserted"] += r.inserted
        return out
    if stage == "generate":
        from cai.generate import run_generate

        return run_generate(store, cfg.generate, progress=False)
    raise NotImplementedError(f"stage {stage!r} is not wired into the pipeline yet")
