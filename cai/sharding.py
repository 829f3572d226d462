"""Deterministic sharding of a stage's work: ``--shard I/N`` (0 <= I < N).

An item belongs to shard ``I`` of ``N`` when ``hash(item key) mod N == I``, with the key an id the
item already has (prompt, generation or comparison id: content hashes). Membership never depends
on an item's position, on what else is selected or on what is already stored, and seeds are
derived from the same ids (``cai.engines.item_seed``), so the union of the N shards' rows is
exactly the rows of one unsharded run, whichever machine ran which shard.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")
_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, key: str) -> bool:
        return shard_of(key, self.count) == self.index


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) an item with this key belongs to."""
    return int.from_bytes(hashlib.sha256(f"shard:{key}".encode()).digest()[:8], "big") % count


def parse_shard(text: str | Shard | None) -> Shard | None:
    """``"I/N"`` -> Shard(I, N); ``None`` -> None. Raises ValueError saying how to write it."""
    if text is None or isinstance(text, Shard):
        return text
    m = _PATTERN.match(str(text))
    if not m:
        raise ValueError(f"shard {text!r} must look like I/N, e.g. 0/4 (shard I of N, 0 <= I < N)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {text!r}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
    return Shard(index, count)


def _check(value: str | None) -> str | None:
    parse_shard(value)
    return None if value is None else str(value).replace(" ", "")


# The ``shard`` field of a stage config: "I/N" or null (everything).
ShardField = Annotated[str | None, AfterValidator(_check)]


def take_shard(items: Iterable[T], shard: str | Shard | None, key: Callable[[T], str]) -> list[T]:
    """The items of ``shard`` (all of them when ``shard`` is None), in their original order."""
    s = parse_shard(shard)
    items = list(items)
    return items if s is None else [x for x in items if s.holds(key(x))]


def split_shards(items: Iterable[T], count: int, key: Callable[[T], str]) -> list[list[T]]:
    """All ``count`` shards of ``items`` at once (what a driver fans out)."""
    out: list[list[T]] = [[] for _ in range(count)]
    for x in items:
        out[shard_of(key(x), count)].append(x)
    return out


def shard_note(shard: str | None) -> dict[str, Any]:
    return {"shard": shard} if shard else {}
