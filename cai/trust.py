"""Run files that run code of their own, and where that is refused.

A run file can make cai execute code that is not cai's: a ``python:module:function`` (or
``python:path/file.py:function``) reward, or engine options that load code (``trust_remote_code``
runs a model's own Python from its folder or the hub; several vLLM options import classes by name).
On a person's machine (``cai run``) that is their choice. A Prefect deployment is different: anyone
who can start a flow run on the server chooses the run file (``run_file`` is a run parameter), and
the worker that runs it may hold GPUs, data and credentials. So a deployed flow run refuses such a
run file unless the deployment itself allows it: ``allow_untrusted_code: true`` among the
deployment's parameters in ``flows/prefect.yaml`` (what ``cai deploy`` registers). A value given
for one flow run only does not count: the permission is read from the deployment, which is part of
the reviewed repository, not from the run request.

``find_untrusted_code`` and ``refuse_untrusted_code`` are pure functions over the loaded run config
(and the judge specs it names); the flows call them first thing (``flows/pipeline.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Engine options that make vLLM or transformers execute code named by the option's value.
CODE_OPTIONS: dict[str, str] = {
    "trust_remote_code": "runs the model's own Python code (from its folder or the hub)",
    "worker_cls": "imports a worker class by name",
    "worker_extension_cls": "imports a worker extension class by name",
    "logits_processors": "imports logits processor classes by name",
    "kv_transfer_config": "can import a KV connector module by path",
    "reasoning_parser_plugin": "imports a Python file",
    "tool_parser_plugin": "imports a Python file",
}
# python: rewards from cai's own package are code the worker runs anyway (e.g. python:cai.ppo:reward_brevity).
_CAI_MODULE = re.compile(r"cai(\.[A-Za-z_]\w*)*")
ALLOW_PARAMETER = "allow_untrusted_code"


class UntrustedCodeError(ValueError):
    """A deployed flow run was asked to run a run file that runs code of its own."""


@dataclass(frozen=True)
class CodeUse:
    field: str  # where in the run file (or judge spec), e.g. "ppo.reward"
    value: str
    why: str

    def __str__(self) -> str:
        return f"{self.field}: {self.value} ({self.why})"


def python_reward_is_builtin(spec: str) -> bool:
    """``python:cai.<module>:<function>``: a function of cai itself, not code from the run file."""
    target = spec.removeprefix("python:")
    module = target.rsplit(":", 1)[0] if ":" in target else ""
    return bool(_CAI_MODULE.fullmatch(module))


def _walk(value: Any, path: str) -> Iterable[tuple[str, str, Any]]:
    """(dotted path, last key, value) for every leaf and dict entry under ``value``."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            yield sub, str(k), v
            yield from _walk(v, sub)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() not in ("", "0", "false", "no", "off", "none", "null")
    return bool(v)


def code_uses(section: Mapping[str, Any], prefix: str) -> list[CodeUse]:
    """Code-running settings in one mapping (a stage section, or a judge spec's fields)."""
    found = []
    for path, key, value in _walk(section, ""):
        if isinstance(value, str) and value.startswith("python:") and not python_reward_is_builtin(value):
            found.append(CodeUse(f"{prefix}.{path}", value, "calls a Python function outside cai"))
        elif key in CODE_OPTIONS and _truthy(value):
            found.append(CodeUse(f"{prefix}.{path}", str(value), CODE_OPTIONS[key]))
    return found


def find_untrusted_code(cfg: Any, stages: Iterable[str] | None = None,
                        judge_specs: Mapping[str, Any] | None = None) -> list[CodeUse]:
    """Every setting of the stages that will run (default: the file's) that runs code not in cai.

    ``cfg`` is a loaded ``PipelineConfig``; ``judge_specs`` maps the judge spec names the stages use
    (``label.judge``, ``ppo.reward: judge:NAME``, ...) to loaded ``JudgeSpec`` objects, whose
    ``engine_options`` count too. A setting a section inherited from the top of the file is reported
    under its top-level name, once."""
    todo = list(stages) if stages is not None else cfg.ordered_stages()
    found: dict[str, CodeUse] = {}
    for stage in todo:
        if stage == "ingest":
            continue
        section = getattr(cfg, stage).model_dump(mode="json")
        explicit = set(cfg.explicit.get(stage, []))
        for use in code_uses(section, stage):
            key = use.field.removeprefix(f"{stage}.").split(".")[0].split("[")[0]
            if key not in explicit and key in type(cfg).model_fields:  # inherited from the top level
                use = CodeUse(use.field.removeprefix(f"{stage}."), use.value, use.why)
            found.setdefault(use.field, use)
        for name in judge_names(section):
            spec = (judge_specs or {}).get(name)
            if spec is not None:
                for use in code_uses({"engine_options": spec.engine_options}, f"judge spec {name}"):
                    found.setdefault(use.field, use)
    return list(found.values())


def judge_names(section: Mapping[str, Any]) -> list[str]:
    """Judge specs a stage section names: its ``judge`` field, a ``judge:`` reward."""
    names = [section["judge"]] if isinstance(section.get("judge"), str) else []
    for key in ("reward", "reward_model", "gold_rm"):
        v = section.get(key)
        if isinstance(v, str) and v.startswith("judge:"):
            names.append(v.removeprefix("judge:"))
    return names


def load_judge_specs(cfg: Any, stages: Iterable[str]) -> dict[str, Any]:
    """The judge specs the stages name, loaded (one that does not load is left to its stage to report)."""
    from cai.judge_spec import load_judge_spec, resolve_judge_spec

    specs: dict[str, Any] = {}
    for stage in stages:
        if stage == "ingest":
            continue
        for name in judge_names(getattr(cfg, stage).model_dump(mode="json")):
            try:
                specs[name] = load_judge_spec(resolve_judge_spec(name))
            except Exception:  # noqa: BLE001, S112 - reported by the stage that uses it
                continue
    return specs


def refuse_untrusted_code(cfg: Any, run_file: str, *, in_deployment: bool, allowed: bool,
                          stages: Iterable[str] | None = None, judge_specs: Mapping[str, Any] | None = None,
                          asked_per_run: bool = False) -> list[CodeUse]:
    """Raise ``UntrustedCodeError`` when a deployed run (``in_deployment``) would run code from the
    run file and its deployment does not allow it (``allowed``). Outside a deployment (``cai run``,
    tests, notebooks) nothing is refused. Returns what was found (empty: nothing to allow)."""
    found = find_untrusted_code(cfg, stages, judge_specs)
    if not found or not in_deployment or allowed:
        return found
    raise untrusted_error(run_file, found, asked_per_run=asked_per_run, local=f"cai run {run_file}")


def untrusted_error(source: str, found: Iterable[CodeUse], *, asked_per_run: bool = False,
                    local: str = "cai run") -> UntrustedCodeError:
    """The one error a deployed run gives: the file, each field, and how to allow it."""
    per_run = (" (a value given for one flow run does not count: the deployment must set it)"
               if asked_per_run else "")
    return UntrustedCodeError(
        f"{source}: refused in a Prefect deployment because it runs code that is not cai's: "
        + "; ".join(map(str, found))
        + f". To allow it, set `{ALLOW_PARAMETER}: true` in this deployment's parameters in flows/prefect.yaml "
        f"and run `cai deploy` again{per_run}; or run it locally (`{local}`).")
