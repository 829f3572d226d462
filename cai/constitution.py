"""Constitution files: what "good" means, as a list of principles.

A principle carries three requests, one per stage that uses it:
``critique`` (SL-CAI: ask the model to find faults in its last response),
``revision`` (SL-CAI: ask it to rewrite the response), and
``judge`` (RLAIF: the pairwise question an AI judge answers with (A) or (B)).

An optional ``contrast`` block holds two system-prompt instructions, one to follow the principle
and one to violate it (RLCD, Yang et al. 2023). The ``contrast`` pair kind samples a response
under each with the same seed and labels the pair by construction; the ``pointwise`` and
``contrast_likelihood`` judge methods read them too.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cai.yamlio import Problem, SpecError, field_name, line_of, validate_file

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
PrincipleId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=80)]


class Contrast(BaseModel):
    """RLCD prompt affixes: system-prompt instructions to follow and to violate the principle."""

    model_config = ConfigDict(extra="forbid")

    follow: Text = Field(description="System-prompt instruction that makes the assistant follow the principle.")
    violate: Text = Field(description="System-prompt instruction that makes the assistant violate it.")


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: PrincipleId = Field(description="Unique, kebab-case identifier, e.g. 'avoid-physical-harm'.")
    critique: Text = Field(description="Request asking the model to critique its last response by this principle.")
    revision: Text = Field(description="Request asking the model to rewrite its response by this principle.")
    judge: Text = Field(description="Pairwise question for an AI judge: which of (A) and (B) better follows the principle?")
    weight: float = Field(1.0, gt=0, description="Relative chance of being sampled.")
    tags: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list)
    contrast: Contrast | None = Field(
        None, description="RLCD: instructions to follow / violate the principle (contrast pairs).")


class Example(BaseModel):
    """A worked critique/revision, placed before the conversation as a few-shot example."""

    model_config = ConfigDict(extra="forbid")

    principle: PrincipleId | None = Field(None, description="Principle whose requests the example uses.")
    prompt: Text
    response: Text
    critique: Text
    revision: Text


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    name: Text
    version: Text = Field(description="Bump when principles change; rows record the content hash anyway.")
    description: str = ""
    principles: list[Principle] = Field(min_length=1)
    examples: list[Example] = Field(default_factory=list)

    # Not part of the file: where it was loaded from and its raw text.
    _path: str | None = None
    _text: str | None = None

    @property
    def hash(self) -> str:
        """Content hash of the validated constitution (comments and formatting don't change it)."""
        data = self.model_dump(mode="json")
        for p in data["principles"]:  # a file without contrast blocks keeps the hash it had before them
            if p.get("contrast") is None:
                p.pop("contrast", None)
        canonical = json.dumps(data, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def text(self) -> str:
        return self._text if self._text is not None else json.dumps(self.model_dump(mode="json"), indent=2)

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(f"constitution {self.name!r} has no principle {principle_id!r}")

    def sample_principles(self, k: int, rng: random.Random) -> list[Principle]:
        """Sample ``k`` principles with replacement, in proportion to their weights."""
        return rng.choices(self.principles, weights=[p.weight for p in self.principles], k=k)


def _cross_field_problems(data: dict, file: str, lines: dict) -> list[Problem]:
    """Duplicate principle ids and examples naming unknown principles (checked on the raw data)."""
    problems = []
    seen: dict[str, int] = {}
    principles = data.get("principles") if isinstance(data.get("principles"), list) else []
    for i, p in enumerate(principles):
        pid = p.get("id") if isinstance(p, dict) else None
        if not isinstance(pid, str):
            continue
        loc = ("principles", i, "id")
        if pid in seen:
            problems.append(Problem(file, line_of(lines, loc), field_name(loc),
                                    f"duplicate principle id {pid!r} (also principles[{seen[pid]}]); ids must be unique"))
        else:
            seen[pid] = i
    for i, p in enumerate(principles):
        block = p.get("contrast") if isinstance(p, dict) else None
        if isinstance(block, dict) and isinstance(block.get("follow"), str) \
                and isinstance(block.get("violate"), str) \
                and block["follow"].strip() and block["follow"].strip() == block["violate"].strip():
            loc = ("principles", i, "contrast", "violate")
            problems.append(Problem(file, line_of(lines, loc), field_name(loc),
                                    "contrast.follow and contrast.violate are the same text; the violate "
                                    "instruction must ask for the opposite of the follow one"))
    examples = data.get("examples") if isinstance(data.get("examples"), list) else []
    for i, ex in enumerate(examples):
        ref = ex.get("principle") if isinstance(ex, dict) else None
        loc = ("examples", i, "principle")
        if isinstance(ref, str) and ref not in seen:
            problems.append(Problem(file, line_of(lines, loc), field_name(loc),
                                    f"unknown principle {ref!r}; use one of the ids under 'principles'"))
    return problems


def load_constitution(path: str | Path) -> Constitution:
    """Load and validate a constitution file; raise SpecError listing every problem."""
    path = Path(path)
    c, _ = validate_file(Constitution, path, extra_checks=_cross_field_problems)
    c._path = str(path)
    c._text = path.read_text(encoding="utf-8")
    return c


def lint(path: str | Path) -> list[Problem]:
    """Every problem in a constitution file (empty list: the file is fine)."""
    try:
        load_constitution(path)
    except SpecError as e:
        return e.problems
    return []


def json_schema() -> dict:
    schema = Constitution.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cai constitution"
    return schema


def resolve_constitution(name_or_path: str | Path, root: Path | None = None) -> Path:
    """'harmless' -> constitutions/harmless.yaml; a path is returned as is."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        return p
    root = root or Path.cwd()
    for cand in (root / "constitutions" / f"{p}.yaml", root / "constitutions" / f"{p}.yml"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"no constitution {str(name_or_path)!r}: give a path or a name from constitutions/")
