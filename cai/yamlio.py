"""Load YAML spec files (constitutions, judges, run files) and validate them with pydantic,
reporting every problem as ``file:line: field: message``.

PyYAML's safe loader gives us plain data without line numbers, and pydantic's errors point at
fields, not lines. So we compose the YAML node tree ourselves, remember the line of every key
and list item, and translate each pydantic error location back to a line of the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field or '<file>'}: {self.message}"


class SpecError(ValueError):
    """One or more problems in a spec file. ``str()`` lists them all, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def field_name(loc: Loc) -> str:
    """('principles', 3, 'id') -> 'principles[3].id'"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap"}


class _LineTracker:
    def __init__(self, text: str, file: str):
        self.file = file
        self.lines: dict[Loc, int] = {}
        self.problems: list[Problem] = []
        self._loader = yaml.SafeLoader(text)

    def load(self) -> Any:
        try:
            node = self._loader.get_single_node()
            if node is None:
                return None
            self.lines[()] = node.start_mark.line + 1
            return self._build(node, ())
        finally:
            self._loader.dispose()

    def _build(self, node: yaml.Node, loc: Loc) -> Any:
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _PLAIN_TAGS:
            # Safe loading: custom tags (e.g. !!python/object) are refused, never constructed.
            raise yaml.constructor.ConstructorError(None, None, f"unsupported YAML tag {node.tag!r}",
                                                    node.start_mark)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._loader.construct_object(key_node, deep=True)
                key_loc = (*loc, key)
                line = key_node.start_mark.line + 1
                if key in out:
                    self.problems.append(
                        Problem(self.file, line, field_name(key_loc),
                                f"duplicate key {key!r} (first at line {self.lines[key_loc]}); keep one")
                    )
                    continue
                self.lines[key_loc] = line
                out[key] = self._build(value_node, key_loc)
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.lines[(*loc, i)] = item.start_mark.line + 1
                items.append(self._build(item, (*loc, i)))
            return items
        return self._loader.construct_object(node, deep=True)


def load_yaml(path: str | Path) -> tuple[Any, dict[Loc, int], list[Problem]]:
    """Safely load a YAML file. Returns (data, line of every key/item, structural problems)."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise SpecError([Problem(file, None, "", "file not found")])
    text = path.read_text(encoding="utf-8")
    tracker = _LineTracker(text, file)
    try:
        data = tracker.load()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        msg = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise SpecError([Problem(file, line, "", f"not valid YAML: {msg}")]) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(file, None, "", f"not valid YAML: {e}")]) from None
    return data, tracker.lines, tracker.problems


def line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The line of ``loc``, or of its nearest ancestor that exists in the file."""
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _pydantic_message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing; add it"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "list_type":
        return "should be a list, e.g. [a, b] or one '- item' per line"
    return err["msg"]


def validate_file(model: type[M], path: str | Path, *, expect: str = "a mapping",
                  extra_checks: Callable[[dict, str, dict[Loc, int]], list[Problem]] | None = None,
                  ) -> tuple[M, dict[Loc, int]]:
    """Load ``path`` and validate it as ``model``; raise SpecError listing every problem.

    ``extra_checks(raw_data, file, lines)`` adds cross-field problems (duplicate ids, dangling
    references); it runs on the raw data so its problems are reported together with pydantic's.
    """
    file = str(path)
    data, lines, problems = load_yaml(path)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError([*problems, Problem(file, lines.get(()), "", f"expected {expect} at the top level, got {got}")])
    if extra_checks is not None:
        problems.extend(extra_checks(data, file, lines))
    try:
        obj = model.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            problems.append(Problem(file, line_of(lines, loc), field_name(loc), _pydantic_message(err)))
        problems.sort(key=lambda p: (p.line or 0))
        raise SpecError(problems) from None
    if problems:
        raise SpecError(problems)
    return obj, lines
