"""``--changed``: after a constitution edit, redo only the labels and revisions the edit touched.

Labels (``cai label --changed``). For every candidate pair that has no label under the new version
yet, the newest label of the same pair by the same judge spec, judge model and seed under an
older version of the same constitution (by name) is found, and the two versions are diffed:

* the pair's principles are drawn again under the new version; the draw is keyed per principle
  (``cai.draws``), so it differs from the old one only where an added principle enters it, a
  removed one leaves it, or a weight change moves it;
* the pair is **judged again** when its draw differs or one of its principles changed a field the
  judge reads (everything but ``critique``, ``revision``, ``tags``; ``weight`` too when every
  principle is averaged);
* otherwise the label is **carried over**: a new ``comparisons`` row under the new version that
  copies the old label and names the row that was judged in ``carried_from``. No engine call.

The result is the labelling a full run under the new version would have produced, at the cost of
the changed pairs only. Pairs never labelled under an older version are left to a plain ``cai label``.

Revisions (``cai critique --changed``): per generation, the newest older version's rounds are
walked in order; round ``r`` is carried while the new draw picks the same principle, that
principle's ``critique``/``revision`` did not change and the few-shot examples' context did not
change; from the first round that fails, the rounds are redone (later rounds build on its text).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cai.constitution import Constitution
from cai.judge import choose_principles
from cai.judge_spec import JudgeSpec
from cai.store import Store, now
from cai.versions import (
    CRITIQUE_INERT,
    LABEL_INERT,
    ConstitutionDiff,
    diff_versions,
    from_constitution,
    stored_versions,
)


def _table_columns(store: Store, table: str) -> list[str]:
    return [r["column_name"] for r in store.query(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position", [table])]


def _diffs(store: Store, constitution: Constitution) -> tuple[dict[str, ConstitutionDiff], dict[str, Any]]:
    """Diff of every stored older version of this constitution against it, by old hash."""
    new = from_constitution(constitution)
    olds = {v.hash: v for v in stored_versions(store, constitution.name) if v.hash != constitution.hash}
    return {h: diff_versions(v, new) for h, v in olds.items()}, olds


# ---- labels ------------------------------------------------------------------------------------------
def plan_label_changed(store: Store, constitution: Constitution, spec: JudgeSpec, judge_model_id: str,
                       pairs: list[dict[str, Any]], seed: int,
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Split ``pairs`` (not yet labelled under ``constitution``; each with ``comparison_id`` and
    ``draw_key``) into pairs to judge again and rows to carry over. Returns (todo, carried rows
    without run_id, summary)."""
    import pyarrow as pa

    from cai.label import principle_refs

    diffs, _ = _diffs(store, constitution)
    stats: Counter[str] = Counter()
    summary: dict[str, Any] = {"previous_versions": sorted(diffs)}
    if not pairs:
        return [], [], summary | {"rejudge": 0, "carried": 0, "never_labelled": 0, "reasons": {}}
    keys = pa.table({"pair_kind": [p["pair_kind"] for p in pairs], "prompt_id": [p["prompt_id"] for p in pairs],
                     "a_id": [p["a_id"] for p in pairs], "b_id": [p["b_id"] for p in pairs]})
    with store.read() as con:
        con.register("_pairs", keys)
        cur = con.execute("""
            SELECT c.* FROM comparisons c
            JOIN constitutions k USING (constitution_hash)
            JOIN _pairs t ON t.pair_kind = c.pair_kind AND t.prompt_id = c.prompt_id
                         AND t.a_id = c.response_a_id AND t.b_id = c.response_b_id
            WHERE k.name = ? AND c.constitution_hash <> ? AND c.judge_spec_hash = ? AND c.judge_model_id = ?
              AND c.seed = ?
            QUALIFY row_number() OVER (PARTITION BY c.pair_kind, c.prompt_id, c.response_a_id, c.response_b_id
                                       ORDER BY k.created_at DESC, c.created_at DESC, c.comparison_id) = 1""",
                          [constitution.name, constitution.hash, spec.hash, judge_model_id, seed])
        cols = [d[0] for d in cur.description]
        previous = {(r["pair_kind"], r["prompt_id"], r["response_a_id"], r["response_b_id"]): r
                    for r in (dict(zip(cols, row, strict=True)) for row in cur.fetchall())}
    refs = principle_refs(constitution)
    weighted = spec.principles.mode == "all"
    inert = LABEL_INERT - {"weight"} if weighted else LABEL_INERT
    todo, carried = [], []
    stamp = now()
    for p in pairs:
        old = previous.get((p["pair_kind"], p["prompt_id"], p["a_id"], p["b_id"]))
        if old is None:
            stats["never_labelled"] += 1
            continue
        d = diffs[old["constitution_hash"]]
        new_ids = [r.id for r in choose_principles(spec, refs, seed, p["draw_key"])]
        old_ids = list(old["principle_ids"] or [])
        if sorted(new_ids) != sorted(old_ids):
            reason = ("removed" if set(old_ids) & set(d.removed) else
                      "added" if set(new_ids) & set(d.added) else "redrawn")
        elif any(d.matters(pid, inert) for pid in new_ids):
            reason = "changed"
        else:
            reason = None
        if reason:
            stats[reason] += 1
            todo.append({**p, "rejudge_reason": reason, "previous_comparison_id": old["comparison_id"]})
            continue
        row = dict(old)
        row.update(comparison_id=p["comparison_id"], constitution_hash=constitution.hash, created_at=stamp,
                   carried_from=old.get("carried_from") or old["comparison_id"])
        carried.append(row)
    summary.update(rejudge=len(todo), carried=len(carried), never_labelled=stats.pop("never_labelled", 0),
                   reasons=dict(stats))
    return todo, carried, summary


# ---- revisions ---------------------------------------------------------------------------------------
def carry_critique(store: Store, cfg: Any, constitution: Constitution, model_id: str,
                   pending: list[Any]) -> tuple[list[Any], list[dict[str, Any]], dict[str, Any]]:
    """For ``cai critique --changed``: carry the rounds an edit did not touch to the new version and
    keep only generations that were revised under an older version. Returns (pending, carried rows
    without run_id, summary). ``pending`` items are updated in place (their carried rounds)."""
    from cai.critique import n_examples, pick_principle, revision_id

    diffs, olds = _diffs(store, constitution)
    columns = _table_columns(store, "revisions")
    # Candidate rows: every older version's ids for each generation's rounds, with that version's
    # critique settings hash (the example count is part of it).
    wanted: dict[str, tuple[str, int, str]] = {}  # revision id -> (generation, round, old hash)
    for h, v in olds.items():
        try:
            old_c = Constitution.model_validate(v.data)
        except Exception:  # noqa: BLE001 - a version this code can no longer read is not carried
            continue
        phash = cfg.params_hash(old_c)
        for p in pending:
            if p.next_round == 1:
                for r in range(1, cfg.rounds + 1):
                    wanted[revision_id(p.generation_id, r, h, model_id, phash)] = (p.generation_id, r, h)
    rows: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    if wanted:
        import pyarrow as pa

        with store.read() as con:
            con.register("_ids", pa.table({"id": list(wanted)}))
            cur = con.execute(f"SELECT {', '.join(columns)} FROM revisions WHERE revision_id IN (SELECT id FROM _ids)")
            for row in cur.fetchall():
                rec = dict(zip(columns, row, strict=True))
                g, r, h = wanted[rec["revision_id"]]
                rows.setdefault((g, h), {})[r] = rec
    first_seen = {v.hash: v.first_seen for v in olds.values()}
    few = n_examples(constitution, cfg.few_shot)
    stats: Counter[str] = Counter()
    keep, carried, stamp = [], [], now()
    for p in pending:
        if p.next_round != 1:
            keep.append(p)  # already (partly) done under the new version: a normal resume
            continue
        chains = [(h, rs) for (g, h), rs in rows.items() if g == p.generation_id and 1 in rs]
        if not chains:
            stats["never_revised"] += 1
            continue
        h, chain = max(chains, key=lambda c: (first_seen[c[0]], c[0]))
        d = diffs[h]
        named = {ex.principle for ex in constitution.examples[:few] if ex.principle}
        context_changed = few > 0 and (any(c.field.startswith("examples") for c in d.other)
                                       or any(d.matters(pid, CRITIQUE_INERT) or pid in d.added for pid in named))
        keep.append(p)
        for r in range(1, cfg.rounds + 1):
            old = chain.get(r)
            new_principle = pick_principle(constitution, cfg.seed, p.generation_id, r)
            if old is None:
                stats["old_chain_shorter"] += 1
                break
            reason = ("examples_changed" if context_changed else
                      "redrawn" if old["principle_id"] != new_principle.id else
                      "changed" if d.matters(new_principle.id, CRITIQUE_INERT) else None)
            if reason:
                stats[reason] += 1
                break
            row = dict(old)
            row.update(revision_id=p.ids[r - 1], constitution_hash=constitution.hash, created_at=stamp,
                       parent_revision_id=p.current_id, carried_from=old.get("carried_from") or old["revision_id"])
            carried.append(row)
            p.record(row)
    redo = sum(cfg.rounds - p.next_round + 1 for p in keep if p.next_round <= cfg.rounds)
    summary = {"previous_versions": sorted(olds), "rounds_carried": len(carried), "rounds_redone": redo,
               "never_revised": stats.pop("never_revised", 0), "reasons": dict(stats)}
    return keep, carried, summary
