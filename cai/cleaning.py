"""Rules that clean known artefacts out of model-written critiques and revisions.

Small models rarely answer a revision request with just the rewritten response. They announce it
("Sure! Here is the revised response:"), wrap it in quotes, repeat their critique first, label the
parts ("Critique: ... Revision: ..."), or add a note about what they changed. Each rule below
removes one such artefact and is named, so a row records which rules touched it (``cleaning``),
and ``tests/test_critique.py`` pins what each rule does and does not touch.

Rules never invent text and never rescue a bad revision: what is left after cleaning is judged by
``classify_revision`` (empty, unchanged, too long, a copy of the critique), and the stage stores
that status with the row instead of dropping it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# ---- patterns --------------------------------------------------------------------------------
# Leftover chat-template tokens written out as text, and a role label at the very start.
_SPECIAL = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|end_of_turn)\|>(?:\s*(?:assistant|user|system)\b)?")
_ROLE = re.compile(r"^\s*(?:\*\*)?(?:assistant|ai|response)(?:\*\*)?\s*:\s*", re.I)

_NOUN = r"(?:response|answer|reply|version|revision|rewrite|text|message)"
_ADJ = r"(?:revised|rewritten|improved|updated|new|corrected|edited|safer|better|final|modified)"
# A heading that introduces the rewrite: "Revision:", "**Revised response:**", "Rewritten answer (v2):".
_MARKER = re.compile(
    rf"^[ \t]*(?:\*\*|__|#+[ \t]*)?(?:the[ \t]+)?(?:{_ADJ}[ \t]+(?:assistant(?:'s)?[ \t]+)?{_NOUN}|revision|rewrite)"
    rf"(?:[ \t]*\([^)\n]*\))?[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*(?:\*\*|__)?[ \t]*",
    re.I | re.M,
)
# A line that announces the rewrite and ends in a colon ("Sure! Here's a safer version of the
# assistant's response that avoids ...:"). It must speak of a revision or of the response, so that
# "Here's a simple version of the function:" in a real answer is left alone.
_ANNOUNCE = re.compile(
    r"^[ \t]*(?:(?:sure|certainly|of course|okay|ok|absolutely|alright|great)[!.,]*[ \t]*)?"
    r"(?:here(?:'s|’s| is| are)|below is|i(?:'ve| have)? (?:revised|rewritten|rewrote|updated))\b[^\n]{0,240}:[ \t]*(?:\n|$)",
    re.I,
)
_ABOUT_REWRITE = re.compile(
    rf"\b{_ADJ}\b|\b(?:rewrite|revision)\b|\b(?:the|my|assistant'?s?)[ \t]+(?:\w+[ \t]+)?(?:response|answer|reply)\b", re.I)
_FILLER_ONLY = re.compile(r"^[ \t]*(?:sure|certainly|of course|okay|ok|absolutely|alright)[!.,]*[ \t]*(?:\n|$)", re.I)
# A critique block that leaked in: "Critique: ...", "Critique request: ...".
_CRITIQUE_LABEL = re.compile(r"^[ \t]*(?:\*\*|#+[ \t]*)?critique(?:[ \t]+request)?[ \t]*(?:\*\*)?[ \t]*:", re.I)
# A first paragraph that talks about the response in the third person (a critique, not a rewrite).
_ABOUT_RESPONSE = re.compile(
    r"^[ \t]*(?:the|this)[ \t]+(?:(?:assistant(?:'s)?|original|previous|last|initial|above)[ \t]+)*"
    r"(?:response|answer|reply)\b[^\n]{0,40}?\b(?:is|was|does|did|could|can|fails|failed|encourages|provides|"
    r"gives|contains|includes|suggests|helps|lacks|should|might|may)\b",
    re.I,
)
# A closing remark about the rewrite itself.
_TRAILING_NOTE = re.compile(
    r"^[ \t]*(?:\(?\s*note\b|\*\*note|changes(?: made)?[ \t]*:|"
    r"(?:this|the|my|in this)[ \t]+(?:revised|rewritten|updated|new|improved)?[ \t]*(?:response|version|revision|rewrite)"
    r"[ \t]+(?:removes|avoids|keeps|now|is|no longer|addresses|focuses|maintains|provides)\b|"
    r"i(?:'ve| have)?[ \t]+(?:removed|revised|rewrote|rewritten|changed|replaced|kept|added)\b)",
    re.I,
)
_QUOTES = [('"""', '"""'), ('"', '"'), ("“", "”"), ("'", "'"), ("‘", "’"), ("«", "»"), ("`", "`")]


@dataclass
class Cleaned:
    text: str
    rules: list[str] = field(default_factory=list)  # names of the rules that changed the text, in order


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n[ \t]*\n", text.strip()) if p.strip()]


def normalize(text: str | None) -> str:
    """For comparisons: lower case, one space between words, no surrounding quotes or end punctuation."""
    t = re.sub(r"\s+", " ", (text or "")).strip().lower()
    return t.strip(" \"'“”‘’`*.!?")


# ---- the rules (each: text -> text; unchanged text means the rule did not apply) ---------------
def strip_special_tokens(text: str, **_) -> str:
    """Chat-template tokens written as text (``<|im_end|>``) and a leading ``Assistant:`` label."""
    return _ROLE.sub("", _SPECIAL.sub("", text), count=1)


def strip_request_echo(text: str, *, request: str | None = None, **_) -> str:
    """The model repeated the revision request before answering it."""
    if request and normalize(text).startswith(normalize(request)) and len(normalize(request)) >= 20:
        # Cut at the end of the echoed request (it may span lines; compare word by word).
        words = request.split()
        pattern = r"\s*" + r"\s+".join(re.escape(w) for w in words) + r"[ \t]*:?"
        m = re.match(pattern, text, re.I)
        if m:
            return text[m.end():]
    return text


def strip_preamble(text: str, **_) -> str:
    """A leading announcement of the rewrite ("Here is the revised response:", "Revision:")."""
    t = _FILLER_ONLY.sub("", text, count=1)
    m = _ANNOUNCE.match(t)
    if m and _ABOUT_REWRITE.search(m.group(0)):
        return t[m.end():]
    m = _MARKER.match(t)
    if m:
        return t[m.end():]
    return text


def strip_critique_leak(text: str, *, critique: str | None = None, **_) -> str:
    """Critique text before the rewrite: a labelled "Critique: ... Revision: ..." answer (keep what
    follows the last revision heading), the critique repeated verbatim, or a first paragraph that
    judges "the response" in the third person followed by the rewrite."""
    markers = [m for m in _MARKER.finditer(text) if m.start() > 0 and text[m.end():].strip()]
    if markers:
        return text[markers[-1].end():]
    paras = _paragraphs(text)
    if critique:
        c, t = normalize(critique), normalize(text)
        if len(c) >= 30 and t.startswith(c) and len(t) > len(c) + 10:
            # Drop the paragraphs that make up the repeated critique.
            kept, seen = list(paras), ""
            while kept and len(normalize(seen)) < len(c):
                seen += " " + kept.pop(0)
            if kept:
                return "\n\n".join(kept)
    if len(paras) > 1 and (_CRITIQUE_LABEL.match(paras[0]) or _ABOUT_RESPONSE.match(paras[0])):
        return "\n\n".join(paras[1:])
    return text


def strip_trailing_note(text: str, **_) -> str:
    """A closing remark about the rewrite ("Note: ...", "This revised response removes ...")."""
    paras = _paragraphs(text)
    if len(paras) > 1 and _TRAILING_NOTE.match(paras[-1]):
        return "\n\n".join(paras[:-1])
    return text


def strip_quotes(text: str, **_) -> str:
    """The whole rewrite wrapped in one pair of quotes (no quote of that kind inside)."""
    t = text.strip()
    for left, right in _QUOTES:
        if len(t) > len(left) + len(right) and t.startswith(left) and t.endswith(right):
            inner = t[len(left):-len(right)]
            if left not in inner and right not in inner:
                return inner
    return text


REVISION_RULES = [
    ("special_tokens", strip_special_tokens),
    ("request_echo", strip_request_echo),
    ("preamble", strip_preamble),
    ("critique_leak", strip_critique_leak),
    ("trailing_note", strip_trailing_note),
    ("quotes", strip_quotes),
]
CRITIQUE_RULES = [
    ("special_tokens", strip_special_tokens),
    ("request_echo", strip_request_echo),
]
_CRITIQUE_PREFIX = re.compile(r"^[ \t]*(?:\*\*|#+[ \t]*)?critique[ \t]*(?:\*\*)?[ \t]*:[ \t]*(?:\*\*)?[ \t]*", re.I)


def _apply(text: str, rules, max_passes: int = 3, **context) -> Cleaned:
    applied: list[str] = []
    current = (text or "").strip()
    for _ in range(max_passes):  # a second pass catches e.g. quotes inside a preamble'd answer
        changed = False
        for name, rule in rules:
            new = rule(current, **context).strip()
            if new != current:
                current = new
                changed = True
                if name not in applied:
                    applied.append(name)
        if not changed:
            break
    return Cleaned(current, applied)


def clean_revision(text: str, *, critique: str | None = None, request: str | None = None) -> Cleaned:
    """The revision with known artefacts removed, and the names of the rules that fired."""
    return _apply(text, REVISION_RULES, critique=critique, request=request)


def clean_critique(text: str, *, request: str | None = None) -> Cleaned:
    """The critique with chat-template tokens, an echoed request and a "Critique:" label removed."""
    out = _apply(text, CRITIQUE_RULES, request=request)
    stripped = _CRITIQUE_PREFIX.sub("", out.text, count=1).strip()
    if stripped != out.text:
        out = Cleaned(stripped, [*out.rules, "label"])
    return out


# ---- statuses ----------------------------------------------------------------------------------
STATUSES = ("ok", "empty", "unchanged", "too_long", "copied_critique")


def classify_revision(revision: str, *, previous: str, critique: str | None = None,
                      finish_reason: str | None = None, max_tokens: int | None = None,
                      max_chars: int | None = None, max_growth: float | None = None,
                      rules: list[str] | None = None) -> tuple[str, str | None]:
    """(status, reason) of a cleaned revision.

    * ``empty``: nothing left (said whether the model wrote nothing or cleaning removed it all);
    * ``unchanged``: the same text as the response it revises (case, spacing, quotes aside);
    * ``copied_critique``: the "revision" is the critique again;
    * ``too_long``: cut off by the token limit, longer than ``max_chars``, or more than
      ``max_growth`` times as long as the response it revises;
    * ``ok``: none of the above (``reason`` lists the cleaning rules that fired, if any).
    """
    cleaned_note = f"cleaned: {', '.join(rules)}" if rules else None
    if not revision.strip():
        return "empty", ("nothing left after cleaning (" + ", ".join(rules) + ")") if rules else "model wrote nothing"
    norm = normalize(revision)
    if norm == normalize(previous):
        return "unchanged", "same text as the response it revises"
    if critique and len(normalize(critique)) >= 20 and norm == normalize(critique):
        return "copied_critique", "the revision repeats the critique"
    if finish_reason == "length":
        return "too_long", f"cut off at the token limit ({max_tokens} tokens)" if max_tokens else "cut off"
    if max_chars is not None and len(revision) > max_chars:
        return "too_long", f"{len(revision)} characters > limit {max_chars}"
    if max_growth is not None and previous.strip() and len(revision) > max_growth * max(len(previous.strip()), 50):
        return "too_long", (f"{len(revision) / len(previous.strip()):.1f}x as long as the response it revises "
                            f"(limit {max_growth}x)")
    return "ok", cleaned_note
