"""Export the ``preferences`` view as a preference dataset for TRL / Hugging Face datasets.

``style="conversational"`` (default) writes what TRL's DPO and reward trainers take as
conversational data: ``prompt`` is the list of messages, ``chosen``/``rejected`` are one-message
lists ``[{"role": "assistant", "content": ...}]``; the trainer applies the chat template.
``style="standard"`` writes plain text: ``prompt`` is the last user message, ``chosen``/``rejected``
the response texts.

Besides the three columns every row carries ``id`` (the comparison id) and ``probability``
(P(chosen is better), the soft label, > 0.5), unless ``minimal=True``. The tie rule is the
view's: comparisons with p_a = 0.5 exactly, and invalid ones, are not exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from cai.store import Store

Style = Literal["conversational", "standard"]


def preference_records(store: Store, *, style: Style = "conversational", judge: str | None = None,
                       pair_kind: str | None = None, min_probability: float = 0.5,
                       consistent_only: bool = False, minimal: bool = False) -> list[dict[str, Any]]:
    where, args = ["probability >= ?"], [min_probability]
    if judge:
        where.append("(judge_name = ? OR judge_spec_hash = ?)")
        args += [judge, judge]
    if pair_kind:
        where.append("pair_kind = ?")
        args.append(pair_kind)
    if consistent_only:
        where.append("position_consistent IS NOT FALSE")
    rows = store.query(
        "SELECT comparison_id, prompt, messages, chosen, rejected, probability FROM preferences WHERE "
        + " AND ".join(where) + " ORDER BY prompt_id, comparison_id", args)
    out = []
    for r in rows:
        if style == "conversational":
            rec: dict[str, Any] = {"prompt": json.loads(r["messages"]),
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        else:
            rec = {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        if not minimal:
            rec["id"] = r["comparison_id"]
            rec["probability"] = r["probability"]
        out.append(rec)
    return out


def export_trl(store: Store, out: str | Path, **kwargs: Any) -> int:
    """Write preferences to ``out`` (.jsonl or .parquet); returns the number of rows."""
    out = Path(out)
    records = preference_records(store, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), out)
    elif out.suffix in {".jsonl", ".json"}:
        with out.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"unknown output type {out.suffix!r}; use .jsonl or .parquet")
    return len(records)
