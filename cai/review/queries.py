"""The SQL behind the review page. Every list is paged in the database (LIMIT/OFFSET over a filtered,
sorted query) so a page costs the same whether the store holds a hundred pairs or a hundred thousand;
full texts are read only for the one pair, chain or run being shown.

People's verdicts are ``comparisons`` rows with ``method = 'human'`` (see ``cai.review.verdicts``).
They are linked to the AI's pairs by prompt and the two response ids, in either order: a verdict
row keeps the orientation of the pair the person saw, and ``_HUMAN`` turns its label into
P(lower id is better) so it can be compared with any AI pair over the same two responses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import duckdb

from cai.review.diffs import diff_stats, word_diff

Sort = Literal["newest", "confidence_desc", "confidence_asc"]
MAX_PAGE = 200

# Human verdicts, keyed by the unordered pair: p_lo = P(the response with the smaller id is better).
_HUMAN = """
    SELECT prompt_id, least(response_a_id, response_b_id) AS lo, greatest(response_a_id, response_b_id) AS hi,
           CASE WHEN response_a_id <= response_b_id THEN p_a ELSE 1 - p_a END AS p_lo,
           judge_name AS reviewer, created_at
    FROM comparisons WHERE method = 'human' AND status = 'ok' AND p_a IS NOT NULL
"""

# AI pairs with their confidence (P of the preferred side, in [0.5, 1]) and the unordered key.
_AI = """
    SELECT c.comparison_id, c.prompt_id, c.pair_kind, c.principle_ids, c.constitution_hash, c.judge_name,
           c.judge_spec_hash, c.method, c.p_a_first, c.p_a_swapped, c.p_a, c.position_consistent, c.status,
           c.reason, c.created_at, c.response_a_id, c.response_b_id,
           greatest(c.p_a, 1 - c.p_a) AS confidence,
           least(c.response_a_id, c.response_b_id) AS lo, greatest(c.response_a_id, c.response_b_id) AS hi,
           c.response_a_id <= c.response_b_id AS a_is_lo
    FROM comparisons c WHERE c.method IS DISTINCT FROM 'human'
"""


@dataclass
class PairFilter:
    principle: str | None = None
    tag: str | None = None  # a prompt's tag or a tag of one of the pair's principles
    pair_kind: str | None = None
    judge: str | None = None
    status: str | None = None
    min_confidence: float | None = None  # confidence = max(p_a, 1 - p_a), in [0.5, 1]
    max_confidence: float | None = None
    orderings_disagree: bool = False  # the judge's two orderings prefer different responses
    people_disagree: bool = False  # a person picked the other response than the judge's label
    reviewed: Literal["any", "yes", "no"] = "any"  # by the current reviewer
    sort: Sort = "newest"


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _h_sql(src: str) -> str:
    """People's verdicts per AI pair of ``src`` (rows of ``_AI``): how many, whether one of them picked
    the other side than the judge's final label (ties on either side don't count), and the current
    reviewer's label oriented to the pair's A (one ``?``: the reviewer's judge_name)."""
    return f"""
        SELECT s.comparison_id, count(*) AS n_human,
               bool_or(hv.p_lo <> 0.5 AND s.p_a IS NOT NULL AND s.p_a <> 0.5
                       AND ((CASE WHEN s.a_is_lo THEN hv.p_lo ELSE 1 - hv.p_lo END) > 0.5) <> (s.p_a > 0.5))
                   AS people_disagree,
               any_value(CASE WHEN s.a_is_lo THEN hv.p_lo ELSE 1 - hv.p_lo END) FILTER (WHERE hv.reviewer = ?)
                   AS my_p
        FROM {src} s JOIN hv ON hv.prompt_id = s.prompt_id AND hv.lo = s.lo AND hv.hi = s.hi
        GROUP BY s.comparison_id"""


def _pairs_sql(f: PairFilter, reviewer: str | None) -> tuple[str, list[Any]]:
    """The AI pairs the filter keeps (one row per comparison, no texts but the prompt's start). People's
    verdicts are joined over all pairs only when a filter needs them; pages join them for their rows."""
    needs_h = f.people_disagree or f.reviewed != "any"
    where: list[str] = []
    params: list[Any] = [reviewer or ""] if needs_h else []
    if f.principle:
        where.append("list_contains(ai.principle_ids, ?)")
        params.append(f.principle)
    if f.tag:
        where.append("""(list_contains(p.tags, ?) OR EXISTS (
            SELECT 1 FROM principles pr WHERE pr.constitution_hash = ai.constitution_hash
              AND list_contains(ai.principle_ids, pr.principle_id) AND list_contains(pr.tags, ?)))""")
        params += [f.tag, f.tag]
    for col, value in (("pair_kind", f.pair_kind), ("judge_name", f.judge), ("status", f.status)):
        if value:
            where.append(f"ai.{col} = ?")
            params.append(value)
    if f.min_confidence is not None:
        where.append("ai.confidence >= ?")
        params.append(f.min_confidence)
    if f.max_confidence is not None:
        where.append("ai.confidence <= ?")
        params.append(f.max_confidence)
    if f.orderings_disagree:
        where.append("ai.position_consistent = false")
    if f.people_disagree:
        where.append("coalesce(h.people_disagree, false)")
    if f.reviewed == "yes":
        where.append("h.my_p IS NOT NULL")
    elif f.reviewed == "no":
        where.append("h.my_p IS NULL")
    sql = f"""
        WITH ai AS ({_AI}), hv AS ({_HUMAN}){f", h AS ({_h_sql('ai')})" if needs_h else ""}
        SELECT ai.*, left(p.prompt_text, 160) AS prompt
        FROM ai LEFT JOIN prompts p USING (prompt_id){" LEFT JOIN h USING (comparison_id)" if needs_h else ""}
        {"WHERE " + " AND ".join(where) if where else ""}
    """
    return sql, params


_ORDER = {
    "newest": "created_at DESC NULLS LAST, comparison_id",
    "confidence_desc": "confidence DESC NULLS LAST, comparison_id",
    "confidence_asc": "confidence ASC NULLS LAST, comparison_id",
}


def list_pairs(con: duckdb.DuckDBPyConnection, f: PairFilter, *, offset: int = 0, limit: int = 50,
               reviewer: str | None = None) -> dict[str, Any]:
    """One page of pairs (no response texts) and the number of pairs the filter matches."""
    limit = max(1, min(limit, MAX_PAGE))
    offset = max(0, offset)
    sql, params = _pairs_sql(f, reviewer)
    total = con.execute(f"SELECT count(*) FROM ({sql})", params).fetchall()[0][0]
    rows = _rows(con, f"""
        WITH page AS (SELECT * FROM ({sql}) ORDER BY {_ORDER[f.sort]} LIMIT ? OFFSET ?),
             hv AS ({_HUMAN}), hp AS ({_h_sql('page')})
        SELECT page.comparison_id, page.prompt_id, page.prompt, page.pair_kind, page.principle_ids, page.judge_name,
               page.method, page.p_a_first, page.p_a_swapped, page.p_a, page.position_consistent, page.confidence,
               page.status, page.created_at, coalesce(hp.n_human, 0) AS n_human,
               coalesce(hp.people_disagree, false) AS people_disagree, hp.my_p
        FROM page LEFT JOIN hp USING (comparison_id)
        ORDER BY {_ORDER[f.sort]}""", [*params, limit, offset, reviewer or ""])
    return {"total": total, "offset": offset, "limit": limit, "rows": rows}


def pair_detail(con: duckdb.DuckDBPyConnection, comparison_id: str) -> dict[str, Any] | None:
    """Everything about one AI pair: texts, principles with their judge questions, both orderings'
    labels, reasoning, constitution, judge spec and the people's verdicts on the same two responses."""
    rows = _rows(con, """
        SELECT c.*, p.prompt_text, p.messages, p.tags AS prompt_tags, p.category, p.split,
               k.name AS constitution_name, k.version AS constitution_version, k.path AS constitution_path
        FROM comparisons c LEFT JOIN prompts p USING (prompt_id)
        LEFT JOIN constitutions k USING (constitution_hash)
        WHERE c.comparison_id = ?""", [comparison_id])
    if not rows:
        return None
    pair = rows[0]
    for key in ("messages", "raw_output", "params"):
        pair[key] = _json(pair[key])
    ids = list(pair["principle_ids"] or [])
    found = {r["principle_id"]: r for r in _rows(con, """
        SELECT principle_id, judge AS question, critique, revision, weight, tags FROM principles
        WHERE constitution_hash = ? AND list_contains(?, principle_id)""", [pair["constitution_hash"], ids])}
    per_principle = {d.get("id"): d for d in (pair["raw_output"] or {}).get("principles", [])
                     if isinstance(pair["raw_output"], dict) and isinstance(d, dict)}
    pair["principles"] = [{"principle_id": pid, **found.get(pid, {}), "label": per_principle.get(pid)}
                          for pid in ids]
    pair["human_verdicts"] = _rows(con, """
        SELECT judge_name AS reviewer, CASE WHEN response_a_id = ? THEN p_a ELSE 1 - p_a END AS p_a,
               comparison_id, created_at
        FROM comparisons WHERE method = 'human' AND status = 'ok' AND prompt_id = ?
          AND ((response_a_id = ? AND response_b_id = ?) OR (response_a_id = ? AND response_b_id = ?))
        ORDER BY created_at""", [pair["response_a_id"], pair["prompt_id"], pair["response_a_id"],
                                 pair["response_b_id"], pair["response_b_id"], pair["response_a_id"]])
    # An initial-vs-revised pair's B is a revision: link its critique chain.
    chain = con.execute("SELECT revision_id FROM revisions WHERE revision_id IN (?, ?) LIMIT 1",
                        [pair["response_a_id"], pair["response_b_id"]]).fetchall()
    pair["revision_id"] = chain[0][0] if chain else None
    return pair


def reviewed_pair(con: duckdb.DuckDBPyConnection, comparison_id: str) -> dict[str, Any] | None:
    """The columns a verdict copies from the AI pair it reviews."""
    rows = _rows(con, """
        SELECT comparison_id, prompt_id, pair_kind, response_a_id, response_b_id, response_a, response_b,
               principle_ids, constitution_hash, judge_name, judge_spec_hash, judge_model_id, method
        FROM comparisons WHERE comparison_id = ?""", [comparison_id])
    return rows[0] if rows else None


def agreement(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """How often each AI judge's final label picks the same response as the people who reviewed the
    same two responses (both sides decided: ties of either are left out), with a Wilson 95 % interval.
    One count per (AI label, person's verdict)."""
    rows = _rows(con, f"""
        WITH ai AS ({_AI}), hv AS ({_HUMAN})
        SELECT ai.judge_name, ai.judge_spec_hash, count(*) AS n,
               count(*) FILTER (WHERE ((CASE WHEN ai.a_is_lo THEN hv.p_lo ELSE 1 - hv.p_lo END) > 0.5)
                                      = (ai.p_a > 0.5)) AS agree,
               count(DISTINCT hv.reviewer) AS reviewers
        FROM ai JOIN hv ON hv.prompt_id = ai.prompt_id AND hv.lo = ai.lo AND hv.hi = ai.hi
        WHERE ai.status = 'ok' AND ai.p_a IS NOT NULL AND ai.p_a <> 0.5 AND hv.p_lo <> 0.5
        GROUP BY ALL ORDER BY n DESC, judge_name""")
    for r in rows:
        r["rate"] = r["agree"] / r["n"]
        r["low"], r["high"] = wilson(r["agree"], r["n"])
    return rows


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95 % by default); good at small n and near 0 or 1."""
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- critique chains ------------------------------------------------------------------------
_CHAIN_KEY = "r.generation_id, r.constitution_hash, r.model_id, r.params_hash"


def list_chains(con: duckdb.DuckDBPyConnection, *, principle: str | None = None, status: str | None = None,
                offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """Critique-and-revise chains (one per generation, constitution, reviser and settings), newest first."""
    limit = max(1, min(limit, MAX_PAGE))
    having, params = [], []
    if principle:
        having.append("bool_or(r.principle_id = ?)")
        params.append(principle)
    if status:
        having.append("arg_max(r.status, r.round) = ?")
        params.append(status)
    sql = f"""
        SELECT arg_max(r.revision_id, r.round) AS revision_id, r.generation_id, r.constitution_hash,
               r.model_id, count(*) AS rounds, count(*) FILTER (WHERE r.status = 'ok') AS ok_rounds,
               list(r.principle_id ORDER BY r.round) AS principle_ids, arg_max(r.status, r.round) AS last_status,
               max(r.created_at) AS created_at, left(any_value(p.prompt_text), 160) AS prompt
        FROM revisions r JOIN generations g USING (generation_id) LEFT JOIN prompts p ON p.prompt_id = g.prompt_id
        GROUP BY {_CHAIN_KEY}
        {"HAVING " + " AND ".join(having) if having else ""}"""
    total = con.execute(f"SELECT count(*) FROM ({sql})", params).fetchall()[0][0]
    rows = _rows(con, f"SELECT * FROM ({sql}) ORDER BY created_at DESC, revision_id LIMIT ? OFFSET ?",
                 [*params, limit, max(0, offset)])
    return {"total": total, "offset": max(0, offset), "limit": limit, "rows": rows}


def chain_detail(con: duckdb.DuckDBPyConnection, revision_id: str) -> dict[str, Any] | None:
    """The whole chain a revision belongs to: the initial response, then every round with its
    principle, critique, revision and a word diff against the text that round revised."""
    key = _rows(con, "SELECT generation_id, constitution_hash, model_id, params_hash FROM revisions "
                     "WHERE revision_id = ?", [revision_id])
    if not key:
        return None
    k = key[0]
    head = _rows(con, """
        SELECT g.generation_id, g.text, g.model_id AS generation_model_id, p.prompt_id, p.prompt_text, p.messages,
               k.name AS constitution_name, k.version AS constitution_version
        FROM generations g LEFT JOIN prompts p USING (prompt_id)
        LEFT JOIN constitutions k ON k.constitution_hash = ?
        WHERE g.generation_id = ?""", [k["constitution_hash"], k["generation_id"]])[0]
    head["messages"] = _json(head["messages"])
    rounds = _rows(con, """
        SELECT r.revision_id, r.round, r.principle_id, pr.critique AS principle_critique, pr.tags AS principle_tags,
               r.critique_request, r.critique, r.revision_request, r.revision, r.status, r.reason, r.cleaning,
               r.parent_revision_id, r.model_id, r.seed, r.created_at
        FROM revisions r LEFT JOIN principles pr
             ON pr.constitution_hash = r.constitution_hash AND pr.principle_id = r.principle_id
        WHERE r.generation_id = ? AND r.constitution_hash IS NOT DISTINCT FROM ?
          AND r.model_id IS NOT DISTINCT FROM ? AND r.params_hash IS NOT DISTINCT FROM ?
        ORDER BY r.round""", [k["generation_id"], k["constitution_hash"], k["model_id"], k["params_hash"]])
    texts = {r["revision_id"]: r["revision"] for r in rounds}
    for r in rounds:
        before = texts.get(r["parent_revision_id"], head["text"]) if r["parent_revision_id"] else head["text"]
        r["diff"] = word_diff(before or "", r["revision"] or "")
        r["diff_stats"] = diff_stats(r["diff"])
    return {**head, "constitution_hash": k["constitution_hash"], "reviser_model_id": k["model_id"],
            "rounds": rounds}


# ---- runs -----------------------------------------------------------------------------------
def list_runs(con: duckdb.DuckDBPyConnection, *, stage: str | None = None, offset: int = 0,
              limit: int = 50) -> dict[str, Any]:
    limit = max(1, min(limit, MAX_PAGE))
    where, params = ("WHERE stage = ?", [stage]) if stage else ("", [])
    total = con.execute(f"SELECT count(*) FROM runs {where}", params).fetchall()[0][0]
    rows = _rows(con, f"""
        SELECT run_id, stage, status, started_at, finished_at, summary, error IS NOT NULL AS has_error
        FROM runs {where} ORDER BY started_at DESC NULLS LAST, run_id LIMIT ? OFFSET ?""",
                 [*params, limit, max(0, offset)])
    for r in rows:
        r["summary"] = _json(r["summary"])
    return {"total": total, "offset": max(0, offset), "limit": limit, "rows": rows}


def run_detail(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any] | None:
    rows = _rows(con, "SELECT * FROM runs WHERE run_id = ?", [run_id])
    if not rows:
        return None
    run = rows[0]
    run["params"] = _json(run["params"])
    run["summary"] = _json(run["summary"])
    run["metrics"] = [r["name"] for r in _rows(
        con, "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", [run_id])]
    return run


def model_paths(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r[0] for r in con.execute("SELECT path FROM models WHERE path IS NOT NULL").fetchall()]


# ---- what the filters can choose from ---------------------------------------------------------
def facets(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    def col(sql: str) -> list[Any]:
        return [r[0] for r in con.execute(sql).fetchall()]

    return {
        "principles": _rows(con, """
            SELECT principle_id, max(question) AS question FROM (
                SELECT principle_id, judge AS question FROM principles
                UNION ALL SELECT DISTINCT unnest(principle_ids), NULL FROM comparisons
                WHERE method IS DISTINCT FROM 'human'
            ) WHERE principle_id IS NOT NULL GROUP BY 1 ORDER BY 1"""),
        "tags": col("""SELECT DISTINCT t FROM (SELECT unnest(tags) AS t FROM prompts
                       UNION SELECT unnest(tags) FROM principles) WHERE t IS NOT NULL ORDER BY 1"""),
        "pair_kinds": col("SELECT DISTINCT pair_kind FROM comparisons WHERE method IS DISTINCT FROM 'human' "
                          "AND pair_kind IS NOT NULL ORDER BY 1"),
        "judges": col("SELECT DISTINCT judge_name FROM comparisons WHERE method IS DISTINCT FROM 'human' "
                      "AND judge_name IS NOT NULL ORDER BY 1"),
        "reviewers": col("SELECT DISTINCT judge_name FROM comparisons WHERE method = 'human' ORDER BY 1"),
        "stages": col("SELECT DISTINCT stage FROM runs ORDER BY 1"),
        "counts": _rows(con, """
            SELECT (SELECT count(*) FROM comparisons WHERE method IS DISTINCT FROM 'human') AS pairs,
                   (SELECT count(*) FROM comparisons WHERE method = 'human') AS verdicts,
                   (SELECT count(*) FROM revisions) AS revisions, (SELECT count(*) FROM runs) AS runs""")[0],
    }
