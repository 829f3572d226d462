"""A person's verdict on a pair, stored as a ``comparisons`` row like imported human preferences.

Shape (the same as imported human preferences): ``judge_name = 'human:<reviewer>'``,
``method = 'human'``, ``pair_kind = 'human'``, ``p_a`` = P(response_a is better): 1.0, 0.0, or 0.5
for a tie; the two responses and their ids are copied from the reviewed AI pair, so a verdict is
linked to every AI label of the same two responses by (prompt_id, response ids);
``position_consistent`` is NULL and ``status`` is ``ok``. ``params`` and ``raw_output`` carry the
lineage: reviewer, the reviewed comparison, its constitution hash and judge spec, the time.
A skip writes nothing.

Identity: ``comparison_id`` = hash(prompt_id, the two response ids in sorted order, judge_name). One
person has one verdict per pair of responses, whichever AI comparison showed it to them (the same
two responses may be labelled by several judges, in either order): a changed mind replaces the
row (upsert), and never adds a second one.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal

import duckdb

from cai.store import content_hash

Verdict = Literal["a", "b", "tie", "skip"]
VERDICT_P: dict[str, float] = {"a": 1.0, "b": 0.0, "tie": 0.5}
HUMAN_PREFIX = "human:"
# The same names as imported sources of people's labels (``human:<source>``): they are typed on
# command lines (``train-rm --sources human:alice``), so no spaces, commas or '='.
_REVIEWER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class VerdictError(ValueError):
    pass


def check_reviewer(name: str | None) -> str:
    name = (name or "").strip()
    if name.startswith(HUMAN_PREFIX):
        name = name[len(HUMAN_PREFIX):]
    if not _REVIEWER.match(name):
        raise VerdictError(f"reviewer name {name!r} is not allowed: use 1-64 letters, digits, '.', '-' or '_', "
                           "starting with a letter or digit (e.g. --reviewer alice)")
    return name


def human_judge_name(reviewer: str) -> str:
    return HUMAN_PREFIX + check_reviewer(reviewer)


def human_comparison_id(prompt_id: str, response_a_id: str, response_b_id: str, judge_name: str) -> str:
    lo, hi = sorted([response_a_id or "", response_b_id or ""])
    return content_hash("human_verdict", prompt_id, lo, hi, judge_name)


def verdict_row(pair: dict[str, Any], verdict: str, reviewer: str, *, at: datetime,
                run_id: str | None = None) -> dict[str, Any]:
    """The ``comparisons`` row for ``verdict`` ('a', 'b' or 'tie') on ``pair`` (a reviewed AI pair's
    columns, see ``queries.reviewed_pair``)."""
    if verdict not in VERDICT_P:
        raise VerdictError(f"verdict must be one of a, b, tie (skip writes nothing), not {verdict!r}")
    judge_name = human_judge_name(reviewer)
    lineage = {
        "reviewer": check_reviewer(reviewer), "source": "cai review",
        "reviewed_comparison_id": pair["comparison_id"], "reviewed_pair_kind": pair["pair_kind"],
        "constitution_hash": pair["constitution_hash"], "judge_spec_hash": pair["judge_spec_hash"],
        "judge_name": pair["judge_name"], "judge_model_id": pair["judge_model_id"],
        "principle_ids": list(pair["principle_ids"] or []), "time": at.isoformat(),
    }
    return {
        "comparison_id": human_comparison_id(pair["prompt_id"], pair["response_a_id"], pair["response_b_id"],
                                             judge_name),
        "prompt_id": pair["prompt_id"], "pair_kind": "human",
        "response_a_id": pair["response_a_id"], "response_b_id": pair["response_b_id"],
        "response_a": pair["response_a"], "response_b": pair["response_b"],
        "principle_ids": None, "constitution_hash": None, "judge_name": judge_name, "judge_spec_hash": None,
        "judge_model_id": None, "judge_engine": None, "method": "human",
        "p_a_first": None, "p_a_swapped": None, "p_a": VERDICT_P[verdict], "position_consistent": None,
        "score_a": None, "score_b": None,
        "raw_output": json.dumps({"verdict": verdict, **lineage}),
        "status": "ok", "reason": None, "seed": None, "params": json.dumps(lineage),
        "run_id": run_id, "created_at": at,
    }


_UPDATABLE = ("response_a_id", "response_b_id", "response_a", "response_b", "p_a", "raw_output", "params",
              "run_id", "created_at")


def upsert_verdict(con: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> None:
    """Insert the verdict, or replace the same person's earlier verdict on the same two responses."""
    cols = list(row)
    con.execute(
        f"INSERT INTO comparisons ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
        f"ON CONFLICT (comparison_id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in _UPDATABLE),
        [row[c] for c in cols])


def delete_verdict(con: duckdb.DuckDBPyConnection, pair: dict[str, Any], reviewer: str) -> int:
    """Withdraw a person's verdict on a pair; returns how many rows went (0 or 1)."""
    cid = human_comparison_id(pair["prompt_id"], pair["response_a_id"], pair["response_b_id"],
                              human_judge_name(reviewer))
    n = con.execute("SELECT count(*) FROM comparisons WHERE comparison_id = ? AND method = 'human'",
                    [cid]).fetchall()[0][0]
    con.execute("DELETE FROM comparisons WHERE comparison_id = ? AND method = 'human'", [cid])
    return n
