"""Constitution versions: what the store has seen, and what changed between two versions.

A version is a constitution's content hash. The store keeps each version's text (``constitutions``)
the first time a stage uses it, so every version can be read back and compared. Diffs are
field-level and generic: every field of a principle is compared, nested ones (e.g. ``contrast``)
by their dotted sub-fields, so a field added to the schema later is covered without code here.

Which changes matter to which stage (used by ``--changed``):

* the judge reads a principle's every field except ``critique``, ``revision`` and ``tags``
  (``weight`` decides the draw, handled by the draw itself); a field this module does not know is
  assumed to matter;
* critique and revision read ``critique`` and ``revision`` (and ``weight`` through the draw); the
  few-shot examples read the requests of the principles they name, so a change to the examples, or
  to a named principle's requests, changes every critique conversation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cai.constitution import Constitution, load_constitution
from cai.store import Store

# Principle fields a stage does not read (everything else counts as a change for it).
LABEL_INERT = frozenset({"critique", "revision", "tags", "weight"})
CRITIQUE_INERT = frozenset({"judge", "tags", "weight", "contrast"})


class VersionNotFoundError(LookupError):
    pass


@dataclass
class Version:
    """One constitution version: its hash and its content as plain data."""

    hash: str
    name: str
    version: str | None
    data: dict[str, Any]                     # the validated constitution as JSON-like data
    path: str | None = None
    first_seen: datetime | None = None
    source: str = "file"                     # file | store

    @property
    def principles(self) -> dict[str, dict[str, Any]]:
        return {p["id"]: p for p in self.data.get("principles") or [] if isinstance(p, dict) and "id" in p}

    @property
    def label(self) -> str:
        where = self.path if self.source == "file" and self.path else "store"
        return f"{self.name} {self.version or ''} ({self.hash[:10]}, {where})".replace("  ", " ")


def _as_data(text: str) -> dict[str, Any]:
    """A stored version's text as validated data (defaults filled in), or the raw YAML if it no longer
    validates under this code's schema."""
    raw = yaml.safe_load(text) or {}
    try:
        return Constitution.model_validate(raw).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - an old version may predate a schema change; compare it raw
        return raw if isinstance(raw, dict) else {}


def from_constitution(c: Constitution) -> Version:
    return Version(c.hash, c.name, c.version, c.model_dump(mode="json"), c.path, None, "file")


def stored_versions(store: Store, name: str | None = None) -> list[Version]:
    """Every version in the store (of one constitution name, if given), oldest first."""
    if not store.path.exists():
        return []
    where, args = ("WHERE name = ?", [name]) if name else ("", [])
    rows = store.query(f"SELECT constitution_hash, name, version, path, yaml_text, created_at FROM constitutions "
                       f"{where} ORDER BY created_at, constitution_hash", args)
    return [Version(r["constitution_hash"], r["name"], r["version"], _as_data(r["yaml_text"] or ""), r["path"],
                    r["created_at"], "store") for r in rows]


def resolve_version(store: Store, ref: str) -> Version:
    """A file path, or a stored hash (a unique prefix is enough)."""
    p = Path(ref)
    if p.suffix in {".yaml", ".yml", ".json"} or p.exists():
        return from_constitution(load_constitution(p))
    hits = [v for v in stored_versions(store) if v.hash.startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise VersionNotFoundError(f"{ref!r} is neither a constitution file nor a constitution hash in {store.path} "
                                   "(see `cai constitution history`)")
    raise VersionNotFoundError(f"{ref!r} matches {len(hits)} stored versions "
                               f"({', '.join(v.hash for v in hits)}); give more of the hash")


def newest_stored(store: Store, name: str, exclude: str | None = None) -> Version | None:
    """The version of ``name`` the store saw last (other than ``exclude``)."""
    versions = [v for v in stored_versions(store, name) if v.hash != exclude]
    return versions[-1] if versions else None


# ---- diffs -------------------------------------------------------------------------------------------
@dataclass
class FieldChange:
    field: str
    old: Any
    new: Any


@dataclass
class ConstitutionDiff:
    old: str                                   # labels of both versions, for people
    new: str
    old_hash: str
    new_hash: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[FieldChange]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    other: list[FieldChange] = field(default_factory=list)  # name, version, description, examples, ...

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.other)

    def changed_fields(self, principle_id: str) -> set[str]:
        """Top-level field names of a principle that changed (``contrast.follow`` -> ``contrast``)."""
        return {c.field.split(".")[0].split("[")[0] for c in self.changed.get(principle_id, [])}

    def matters(self, principle_id: str, inert: frozenset[str]) -> bool:
        """Did a field that a stage reads change for this principle?"""
        return bool(self.changed_fields(principle_id) - inert)

    def as_dict(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, "old_hash": self.old_hash, "new_hash": self.new_hash,
                "added": self.added, "removed": self.removed,
                "changed": {k: [asdict(c) for c in v] for k, v in self.changed.items()},
                "unchanged": self.unchanged, "other": [asdict(c) for c in self.other]}

    def markdown(self) -> str:
        lines = [f"### Constitution diff: `{self.old_hash[:10]}` → `{self.new_hash[:10]}`", "",
                 f"- old: {self.old}", f"- new: {self.new}", "",
                 f"{len(self.added)} added, {len(self.removed)} removed, {len(self.changed)} changed, "
                 f"{len(self.unchanged)} unchanged principles.", ""]
        for pid in self.added:
            lines.append(f"- **added** `{pid}`")
        for pid in self.removed:
            lines.append(f"- **removed** `{pid}`")
        for pid, changes in self.changed.items():
            lines.append(f"- **changed** `{pid}`: " + ", ".join(f"`{c.field}`" for c in changes))
            for c in changes:
                lines.append(f"    - `{c.field}`: {_short(c.old)} → {_short(c.new)}")
        for c in self.other:
            lines.append(f"- constitution `{c.field}`: {_short(c.old)} → {_short(c.new)}")
        return "\n".join(lines) + "\n"


def _short(v: Any, width: int = 120) -> str:
    s = "(none)" if v is None else json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else repr(v)
    return s if len(s) <= width else s[:width - 1] + "…"


_MISSING = object()


def field_changes(old: Any, new: Any, prefix: str = "") -> list[FieldChange]:
    """Every differing field between two JSON-like values; dicts are compared key by key (dotted
    names), anything else (text, numbers, lists) as a whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[FieldChange] = []
        for key in sorted(set(old) | set(new), key=lambda k: (list(new).index(k) if k in new else len(new), k)):
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            name = f"{prefix}.{key}" if prefix else str(key)
            if a is _MISSING or b is _MISSING:
                if (None if a is _MISSING else a) != (None if b is _MISSING else b):
                    out.append(FieldChange(name, None if a is _MISSING else a, None if b is _MISSING else b))
            else:
                out += field_changes(a, b, name)
        return out
    return [] if old == new else [FieldChange(prefix or "value", old, new)]


def diff_versions(old: Version, new: Version) -> ConstitutionDiff:
    """Principles added, removed and changed (by id, field by field), and other top-level changes."""
    a, b = old.principles, new.principles
    d = ConstitutionDiff(old.label, new.label, old.hash, new.hash)
    d.added = [pid for pid in b if pid not in a]
    d.removed = [pid for pid in a if pid not in b]
    for pid in b:
        if pid in a:
            changes = field_changes({k: v for k, v in a[pid].items() if k != "id"},
                                    {k: v for k, v in b[pid].items() if k != "id"})
            if changes:
                d.changed[pid] = changes
            else:
                d.unchanged.append(pid)
    d.other = field_changes({k: v for k, v in old.data.items() if k != "principles"},
                            {k: v for k, v in new.data.items() if k != "principles"})
    return d


# ---- history ---------------------------------------------------------------------------------------
def history(store: Store, name: str | None = None) -> list[dict[str, Any]]:
    """Every stored version, oldest first per name: hash, first seen, what changed against the previous
    version of the same name, and what each version produced (revisions, comparisons, models)."""
    versions = stored_versions(store, name)
    if name and not versions:
        names = [r["name"] for r in store.query("SELECT DISTINCT name FROM constitutions ORDER BY 1")]
        raise VersionNotFoundError(f"no constitution named {name!r} in {store.path}; stored: {names or 'none'}")
    counts = {r["h"]: r for r in store.query("""
        SELECT k.constitution_hash AS h,
               (SELECT count(*) FROM revisions r WHERE r.constitution_hash = k.constitution_hash) AS revisions,
               (SELECT count(*) FROM revisions r WHERE r.constitution_hash = k.constitution_hash
                                                   AND r.carried_from IS NOT NULL) AS revisions_carried,
               (SELECT count(*) FROM comparisons c WHERE c.constitution_hash = k.constitution_hash) AS comparisons,
               (SELECT count(*) FROM comparisons c WHERE c.constitution_hash = k.constitution_hash
                                                     AND c.carried_from IS NOT NULL) AS comparisons_carried,
               (SELECT count(*) FROM models m
                 WHERE CAST(m.data_snapshot AS VARCHAR) LIKE '%' || k.constitution_hash || '%') AS models
        FROM constitutions k""")}
    out, previous = [], {}
    for v in versions:
        prev = previous.get(v.name)
        d = diff_versions(prev, v) if prev else None
        c = counts.get(v.hash, {})
        out.append({"name": v.name, "version": v.version, "hash": v.hash, "first_seen": v.first_seen,
                    "path": v.path, "principles": len(v.principles),
                    "added": d.added if d else list(v.principles), "removed": d.removed if d else [],
                    "changed": list(d.changed) if d else [],
                    "other_changes": [ch.field for ch in d.other] if d else [],
                    "revisions": c.get("revisions", 0), "revisions_carried": c.get("revisions_carried", 0),
                    "comparisons": c.get("comparisons", 0), "comparisons_carried": c.get("comparisons_carried", 0),
                    "models": c.get("models", 0)})
        previous[v.name] = v
    return out
