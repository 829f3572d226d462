"""XSTest prompts as evaluation-only prompts: over-refusal (safe prompts that merely sound unsafe)
and refusal of the unsafe contrasts.

The prompts are stored in ``prompts`` like any other (same ids, so generations and evaluations join
on them) but with ``split = 'benchmark'``, category ``xstest_safe`` / ``xstest_unsafe`` and tags
``['xstest', <label>, <type>]``. No stage selects the ``benchmark`` split unless asked for it, so
they are never trained on and never mixed into the held-out ``test`` split's sample.

The sample is seeded: the ``n`` prompts of each label whose hash of (seed, prompt id) is smallest,
so the same seed picks the same prompts whatever the file's order, and a larger ``n`` adds prompts
to a smaller one's sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cai.ingest import _to_row
from cai.store import Store, content_hash, now

SPLIT = "benchmark"
LABELS = ("safe", "unsafe")
CATEGORY = {"safe": "xstest_safe", "unsafe": "xstest_unsafe"}


def load_xstest(path: str | Path) -> list[dict[str, Any]]:
    """Prompt rows ready for ``prompts``; a bad line raises ``ValueError`` naming file, line and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (XSTest prompts: JSONL of prompt, label safe|unsafe, type)")
    rows: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object with prompt, label")
            label = rec.get("label")
            if label not in LABELS:
                raise ValueError(f"{path}:{i}: field 'label' must be 'safe' or 'unsafe', got {label!r}")
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise ValueError(f"{path}:{i}: field 'prompt' must be non-empty text")
            kind = str(rec.get("type") or "unknown")
            body = {k: v for k, v in rec.items() if k not in ("label", "split", "category", "tags")}
            try:
                row = _to_row({**body, "category": CATEGORY[label], "tags": ["xstest", label, kind]}, i, path,
                              0.0, None)
            except ValueError as e:
                raise ValueError(f"{path}:{i}: {e}") from None
            row["split"] = SPLIT
            row["meta"] = json.dumps({"label": label, "type": kind, **json.loads(row["meta"])}, ensure_ascii=False)
            rows.setdefault(row["prompt_id"], row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return list(rows.values())


def ingest_xstest(store: Store, path: str | Path) -> int:
    """Store the XSTest prompts (once; a re-run inserts nothing). Returns rows inserted."""
    rows = load_xstest(path)
    have = store.existing_ids("prompts", "prompt_id", [r["prompt_id"] for r in rows])
    todo = [r for r in rows if r["prompt_id"] not in have]
    if not todo:
        return 0
    run_id = store.start_run("ingest", {"path": str(path), "split": SPLIT, "kind": "xstest"})
    stamp = now()
    for r in todo:
        r["run_id"], r["created_at"] = run_id, stamp
    inserted = store.insert("prompts", todo)
    store.finish_run(run_id, summary={"read": len(rows), "inserted": inserted})
    return inserted


def sample_xstest(store: Store, path: str | Path, per_label: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """Ingest the file if needed and return a seeded sample of ``per_label`` prompts of each label (all
    with None), safe first, as evaluation prompt dicts (prompt_id, messages, category, tags, prompt_text)."""
    ingest_xstest(store, path)
    ids = [r["prompt_id"] for r in load_xstest(path)]
    rows = store.query("SELECT prompt_id, messages, category, tags, prompt_text FROM prompts "
                       "WHERE prompt_id IN (SELECT unnest(?))", [ids])
    out: list[dict[str, Any]] = []
    for label in LABELS:
        group = [r for r in rows if r["category"] == CATEGORY[label]]
        group.sort(key=lambda r: content_hash("xstest-sample", seed, r["prompt_id"]))
        for r in group[:per_label] if per_label is not None else group:
            out.append({"prompt_id": r["prompt_id"], "messages": json.loads(r["messages"]),
                        "category": r["category"], "tags": list(r["tags"] or []), "prompt_text": r["prompt_text"]})
    return out
