"""Which files the review page may serve: PNG plots a run's summary names, and only when they lie
under the store's data folder or under a folder of a model registered in the store.

Paths in a summary are written by our own stages, but the store is a file anyone can edit; a path
like ``/etc/passwd`` or ``../../x.png`` must never be read, whatever it says.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PLOT_SUFFIXES = (".png",)


def plot_paths(summary: Any) -> list[str]:
    """Every string in a run summary (JSON text or parsed) that names a PNG file, in order, once."""
    if isinstance(summary, str):
        try:
            summary = json.loads(summary)
        except ValueError:
            return []
    found: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x.lower().endswith(PLOT_SUFFIXES) and x not in found:
            found.append(x)

    walk(summary)
    return found


def allowed_roots(db_path: Path, model_paths: Iterable[str | None]) -> list[Path]:
    """The data folder (the store's folder) and every registered model folder that exists."""
    roots = [db_path.resolve().parent]
    for p in model_paths:
        if not p:
            continue
        path = Path(p)
        if path.is_dir():
            roots.append(path.resolve())
    return roots


def servable(path: str, roots: Iterable[Path], bases: Iterable[Path] = ()) -> Path | None:
    """The resolved file if it is a PNG under one of ``roots`` (symlinks resolved first), else None.
    A relative path is tried under each of ``bases`` (the folders the stages may have run in)."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [b / p for b in bases]
    roots = list(roots)
    for c in candidates:
        try:
            real = c.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real.suffix.lower() in PLOT_SUFFIXES and real.is_file() and any(real.is_relative_to(r) for r in roots):
            return real
    return None
