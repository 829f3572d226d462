"""Load prompts from JSONL, CSV or Parquet into the ``prompts`` table.

Each record has either ``prompt`` (a user message as text) or ``messages`` (a chat list of
``{"role", "content"}``); optional ``id``, ``category``, ``tags`` (list, or comma-separated in
CSV) and ``split`` (train/test). Any other field is kept in ``meta``.

The whole file is checked before anything is written: one bad record stops the load (and is
reported with its line number and reason) unless ``skip_invalid`` is set, so a file is never
half-ingested.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.store import Store, content_hash, now

ROLES = {"system", "user", "assistant"}
KNOWN = {"id", "prompt", "messages", "category", "tags", "split"}


@dataclass
class BadRecord:
    line: int
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}"


class IngestError(ValueError):
    def __init__(self, path: str, bad: list[BadRecord]):
        self.path, self.bad = path, bad
        shown = "\n".join(f"{path}:{b.line}: {b.reason}" if b.unit == "line" else f"{path}: {b}" for b in bad[:50])
        more = f"\n... and {len(bad) - 50} more" if len(bad) > 50 else ""
        super().__init__(
            f"{len(bad)} bad record(s) in {path}; nothing was written. Fix them, or pass --skip-invalid "
            f"to load the good ones.\n{shown}{more}"
        )


@dataclass
class IngestResult:
    path: str
    read: int = 0
    inserted: int = 0
    already_present: int = 0
    duplicates_in_file: int = 0
    skipped: list[BadRecord] = field(default_factory=list)


def prompt_id_for(messages: list[dict[str, str]]) -> str:
    return content_hash([{"role": m["role"], "content": m["content"]} for m in messages])


def assign_split(prompt_id: str, test_fraction: float) -> str:
    """Deterministic split from the id, so the same prompt lands in the same split everywhere."""
    return "test" if int(prompt_id[:8], 16) / 0xFFFFFFFF < test_fraction else "train"


def _read_records(path: Path) -> tuple[list[tuple[int, Any]], list[BadRecord], str]:
    """(line number, parsed record or exception text) for every record in the file."""
    suffix = path.suffix.lower()
    records: list[tuple[int, Any]] = []
    bad: list[BadRecord] = []
    if suffix in {".jsonl", ".ndjson", ".json"}:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    bad.append(BadRecord(lineno, f"not valid JSON ({e.msg} at column {e.colno})"))
        return records, bad, "line"
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not ({"prompt", "messages"} & set(reader.fieldnames)):
                raise IngestError(str(path), [BadRecord(1, "the header needs a 'prompt' or 'messages' column")])
            start = reader.line_num + 1
            for row in reader:
                rec: dict[str, Any] = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                if isinstance(rec.get("messages"), str):
                    try:
                        rec["messages"] = json.loads(rec["messages"])
                    except json.JSONDecodeError:
                        bad.append(BadRecord(start, "'messages' is not a JSON list"))
                        start = reader.line_num + 1
                        continue
                if isinstance(rec.get("tags"), str):
                    rec["tags"] = [t.strip() for t in rec["tags"].split(",") if t.strip()]
                records.append((start, rec))
                start = reader.line_num + 1
        return records, bad, "line"
    if suffix in {".parquet", ".pq"}:
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            records.append((i, {k: v for k, v in rec.items() if v is not None}))
        return records, bad, "row"
    raise IngestError(str(path), [BadRecord(0, f"unsupported file type {suffix!r}; use .jsonl, .csv or .parquet", "file")])


def _to_row(rec: Any, lineno: int, path: Path, test_fraction: float, category: str | None) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    has_prompt, has_messages = "prompt" in rec, "messages" in rec
    if has_prompt == has_messages:
        raise ValueError("needs exactly one of 'prompt' (text) or 'messages' (a chat list)")
    if has_prompt:
        prompt = rec["prompt"]
        if isinstance(prompt, list):  # some datasets put the chat list under "prompt"
            messages = prompt
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("'prompt' is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            raise ValueError(f"'prompt' must be text, got {type(prompt).__name__}")
    else:
        messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': text}}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be from the user (the model answers it)")
    if not messages[-1]["content"].strip():
        raise ValueError("the last user message is empty")
    tags = rec.get("tags", [])
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("'tags' must be a list of strings")
    split = rec.get("split")
    if split is not None and split not in {"train", "test"}:
        raise ValueError(f"'split' must be 'train' or 'test', got {split!r}")
    pid = prompt_id_for(messages)
    return {
        "prompt_id": pid,
        "messages": json.dumps(messages, ensure_ascii=False),
        "prompt_text": messages[-1]["content"],
        "external_id": None if rec.get("id") is None else str(rec["id"]),
        "category": rec.get("category", category),
        "tags": tags,
        "split": split or assign_split(pid, test_fraction),
        "source": str(path),
        "source_line": lineno,
        "meta": json.dumps({k: v for k, v in rec.items() if k not in KNOWN}, ensure_ascii=False, default=str),
    }


def ingest_file(store: Store, path: str | Path, *, skip_invalid: bool = False, test_fraction: float = 0.1,
                category: str | None = None) -> IngestResult:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    records, bad, unit = _read_records(path)
    result = IngestResult(str(path), read=len(records) + len(bad))
    rows: dict[str, dict[str, Any]] = {}
    for lineno, rec in records:
        try:
            row = _to_row(rec, lineno, path, test_fraction, category)
        except ValueError as e:
            bad.append(BadRecord(lineno, str(e), unit))
            continue
        if row["prompt_id"] in rows:
            result.duplicates_in_file += 1
            continue
        rows[row["prompt_id"]] = row
    bad.sort(key=lambda b: b.line)
    if bad and not skip_invalid:
        raise IngestError(str(path), bad)
    result.skipped = bad
    with store.run("ingest", {"path": str(path), "skip_invalid": skip_invalid,
                              "test_fraction": test_fraction}) as run:
        stamp = now()
        for row in rows.values():
            row["run_id"], row["created_at"] = run["run_id"], stamp
        result.inserted = store.insert("prompts", list(rows.values()))
        result.already_present = len(rows) - result.inserted
        run["summary"] = {"read": result.read, "inserted": result.inserted,
                          "already_present": result.already_present,
                          "skipped": len(bad), "duplicates_in_file": result.duplicates_in_file}
    return result
