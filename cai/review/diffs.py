"""Word-level diffs between two texts, as (op, text) pieces the page renders with textContent."""

from __future__ import annotations

import difflib
import re

# Words, runs of whitespace and single punctuation marks: a diff at this grain reads like an edit.
_TOKEN = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text or "")


def word_diff(old: str, new: str) -> list[tuple[str, str]]:
    """Pieces ``(op, text)`` with op ``same``, ``del`` (only in old) or ``ins`` (only in new); the
    ``same`` and ``del`` pieces spell ``old``, the ``same`` and ``ins`` pieces spell ``new``."""
    a, b = tokens(old), tokens(new)
    out: list[tuple[str, str]] = []

    def push(op: str, text: str) -> None:
        if not text:
            return
        if out and out[-1][0] == op:
            out[-1] = (op, out[-1][1] + text)
        else:
            out.append((op, text))

    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            push("same", "".join(a[i1:i2]))
        else:
            push("del", "".join(a[i1:i2]))
            push("ins", "".join(b[j1:j2]))
    return out


def diff_stats(pieces: list[tuple[str, str]]) -> dict[str, int]:
    """Words removed and added, for a one-line summary of a round."""
    count = {"del": 0, "ins": 0}
    for op, text in pieces:
        if op in count:
            count[op] += len([t for t in tokens(text) if not t.isspace()])
    return {"removed": count["del"], "added": count["ins"]}
