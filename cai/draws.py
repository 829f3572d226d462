"""Weighted draws that stay put when a constitution is edited ("consistent sampling").

Each item gets its own uniform number from a hash of (the draw's key, the item's id), and the
``k`` items with the largest ``u ** (1 / weight)`` are drawn (Efraimidis-Spirakis: a weighted draw
without replacement). Because an item's number does not depend on the other items, editing one
principle's text changes no draw, and adding, removing or re-weighting one principle changes only
the draws it enters or leaves. That is what lets ``cai label --changed`` and ``cai critique
--changed`` redo exactly the work an edit touched: a fresh run under the new version would draw
the same principles for every other pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from cai.store import content_hash

T = TypeVar("T")


def unit(*parts: object) -> float:
    """A number in (0, 1) that depends only on ``parts``."""
    return (int(content_hash(*parts, length=15), 16) + 0.5) / 16 ** 15


def weighted_draw(items: Sequence[T], k: int, key: Sequence[object], *,
                  ident: Callable[[T], str], weight: Callable[[T], float]) -> list[T]:
    """``k`` distinct items (fewer if there are fewer), in proportion to their weights."""
    def score(item: T) -> tuple[float, str]:
        return unit("draw", *key, ident(item)) ** (1.0 / weight(item)), ident(item)

    return sorted(items, key=score, reverse=True)[:max(0, min(k, len(items)))]
