"""Import people's preference pairs into the store: ``cai ingest-preferences FILE [FILE...]``.

Accepted shapes (JSONL, one object a line, or Parquet, one a row; other fields are kept):

* ours / PandaLM: ``prompt`` (a chat list of ``{role, content}`` ending with the user), ``chosen``
  and ``rejected`` (text);
* TRL, standard: ``prompt``, ``chosen``, ``rejected`` as text. A prompt that is itself an HH-style
  transcript (``"\\n\\nHuman: ... \\n\\nAssistant:"``) is read as one;
* TRL, conversational: ``prompt`` a chat list, ``chosen``/``rejected`` one-assistant-message lists;
  or no ``prompt`` and ``chosen``/``rejected`` whole conversations that differ only in the last,
  assistant, message (TRL's implicit prompt);
* raw HH-RLHF: no ``prompt``; ``chosen``/``rejected`` are whole transcripts
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``, split at their last ``"\\n\\nAssistant:"``. Both must
  hold the same conversation before that point.

How the label is read: ``chosen`` is the people's pick, so ``p_a = P(chosen better) = 1.0``, except
where the file has votes: a ``votes`` list in PandaLM's coding (one label per annotator, ``0`` =
tie, the majority label is the chosen response) gives ``(votes for chosen + ties / 2) / votes``;
without it an ``agreement`` of ``"k/n"`` gives ``k / n``. One empty response is a real answer
(PandaLM and HH hold some, and people judged them), so it is kept; two identical responses carry
no preference and are a bad row.

What is written (the storage contract, shared with the review page that stores people's verdicts):
a ``prompts`` row per new prompt (content-hash id, as ``cai ingest``; tagged ``human_preferences``
so ``cai generate``/PPO/evaluate don't take these prompts for the policy, see
``cai.generate.select_prompts``) and a ``comparisons`` row per pair with ``judge_name =
'human:<source>'``, ``method = pair_kind = 'human'``, ``response_a`` = chosen, ``response_b`` =
rejected, ``status = 'ok'``, the file, line, original id and subset in ``params``. Ids are content
hashes, so importing a file twice writes nothing the second time. Human rows stay out of the
``preferences`` view (AI labels) and out of ``train-rm`` unless asked for (``--sources``); read
them through the ``human_preferences`` view.

Every file is checked before anything is written: one bad row (``FILE:LINE: field: what is wrong,
how to fix``) and nothing of the whole set is stored.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.ingest import assign_split, prompt_id_for
from cai.store import Store, content_hash, insert_rows, now
from cai.yamlio import Problem, SpecError

HUMAN_METHOD = "human"          # comparisons.method and comparisons.pair_kind of people's labels
HUMAN_PREFIX = "human:"         # comparisons.judge_name = 'human:<source>'
HUMAN_TAG = "human_preferences"  # prompts.tags of prompts that came in with people's pairs
ROLES = {"system", "user", "assistant"}
SUBSET_FIELDS = ("subset", "source", "category", "data_dir", "domain")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_AGREEMENT = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_TIE_VOTES = {0, "0", "tie", "Tie"}


class PreferenceImportError(SpecError):
    """Bad rows in the files; nothing was written. ``str()`` lists them, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(str(p) for p in problems[:50])
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        ValueError.__init__(self, f"{len(problems)} bad row(s); nothing was written (fix them and run the "
                                  f"same command again):\n{shown}{more}")


class _Bad(ValueError):
    def __init__(self, field_: str, message: str):
        self.field, self.message = field_, message
        super().__init__(f"{field_}: {message}")


@dataclass
class PreferencePair:
    file: str
    line: int
    shape: str                     # messages | trl_text | trl_conversational | trl_implicit | hh_transcript
    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    p_chosen: float = 1.0
    label_from: str = "chosen"     # chosen | votes | agreement
    external_id: str | None = None
    subset: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportSummary:
    files: list[str]
    judge_names: list[str]
    pairs: int = 0
    duplicates_in_file: int = 0
    prompts_new: int = 0
    comparisons_new: int = 0
    comparisons_present: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None


# ---- parsing one record --------------------------------------------------------------------------
def parse_transcript(text: str, field_: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b..."`` as chat messages (contents stripped)."""
    body = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
    parts = _TURN.split(body)
    if parts[0].strip() or len(parts) < 3:
        raise _Bad(field_, "not an HH transcript: it must start with 'Human:' and mark every turn with "
                           "'\\n\\nHuman:' or '\\n\\nAssistant:'")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _looks_like_transcript(text: str) -> bool:
    return text.lstrip().startswith("Human:")


def _check_messages(messages: Any, field_: str, *, last_role: str | None = "user") -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _Bad(field_, "must be a non-empty list of {'role', 'content'} messages, or text")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _Bad(f"{field_}[{i}]", "must be {'role': system|user|assistant, 'content': text}")
        out.append({"role": m["role"], "content": m["content"]})
    if last_role and out[-1]["role"] != last_role:
        raise _Bad(f"{field_}[{len(out) - 1}]", f"the last message must be from the {last_role} "
                                                f"(the compared responses answer it), not {out[-1]['role']!r}")
    return out


def _prompt_messages(prompt: Any) -> tuple[list[dict[str, str]], bool]:
    """(messages, whether the prompt was an HH transcript)."""
    if isinstance(prompt, str):
        if _looks_like_transcript(prompt):
            # TRL's HH datasets end the prompt with the empty turn the responses fill.
            text = re.sub(r"\n\nAssistant:\s*$", "", prompt.rstrip() + "\n\n")
            return _check_messages(parse_transcript(text, "prompt"), "prompt"), True
        return [{"role": "user", "content": prompt}], False
    return _check_messages(prompt, "prompt"), False


def _response(value: Any, field_: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    raise _Bad(field_, "must be the response as text, or a list of one {'role': 'assistant', 'content': text} "
                       f"message; got {type(value).__name__}")


def _split_hh(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """Raw HH-RLHF: both transcripts hold the same conversation, then differ in the last reply."""
    heads = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        cut = text.rfind("\n\nAssistant:")
        if cut < 0:
            raise _Bad(name, "no prompt field and no '\\n\\nAssistant:' turn to split the transcript at; "
                             "give 'prompt', or the whole HH transcript '\\n\\nHuman: ... \\n\\nAssistant: ...'")
        heads[name] = (text[:cut], text[cut + len("\n\nAssistant:"):].strip())
    if heads["chosen"][0].strip() != heads["rejected"][0].strip():
        raise _Bad("rejected", "its transcript differs from chosen's before the last '\\n\\nAssistant:' turn; "
                               "both must hold the same conversation and differ only in the last reply")
    messages = _check_messages(parse_transcript(heads["chosen"][0], "chosen"), "chosen")
    return messages, heads["chosen"][1], heads["rejected"][1]


def _split_implicit(chosen: list, rejected: list) -> tuple[list[dict[str, str]], str, str]:
    """TRL conversational with an implicit prompt: two whole conversations, the last turn differs."""
    c = _check_messages(chosen, "chosen", last_role="assistant")
    r = _check_messages(rejected, "rejected", last_role="assistant")
    if c[:-1] != r[:-1]:
        raise _Bad("rejected", "differs from 'chosen' before the last (assistant) message; with no 'prompt', "
                               "both must hold the same conversation and differ only in the last reply")
    if len(c) < 2:
        raise _Bad("chosen", "holds only the reply; with no 'prompt' it must hold the conversation before it too")
    return _check_messages(c[:-1], "chosen"), c[-1]["content"], r[-1]["content"]


def vote_share(rec: dict[str, Any]) -> tuple[float, str]:
    """(P(chosen better), where it came from): the votes, the agreement, or 1.0."""
    votes = rec.get("votes")
    if votes is not None:
        if not isinstance(votes, list) or not votes or not all(isinstance(v, (int, str)) for v in votes):
            raise _Bad("votes", "must be a non-empty list of per-annotator labels (PandaLM's coding: 0 = tie, "
                                "the majority label = the chosen response); fix it or drop the field")
        ties = sum(v in _TIE_VOTES for v in votes)
        ranked = Counter(v for v in votes if v not in _TIE_VOTES).most_common()
        if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
            raise _Bad("votes", f"{votes} has no majority, so it cannot say which response people chose; "
                                "drop the row, or the votes to label it 1.0")
        return (ranked[0][1] + ties / 2) / len(votes), "votes"
    agreement = rec.get("agreement")
    if agreement is not None:
        m = _AGREEMENT.match(str(agreement))
        if not m or int(m.group(2)) <= 0 or not int(m.group(2)) / 2 < int(m.group(1)) <= int(m.group(2)):
            raise _Bad("agreement", f"{agreement!r} is not 'k/n' with a majority (n/2 < k <= n); fix it or "
                                    "drop the field")
        return int(m.group(1)) / int(m.group(2)), "agreement"
    return 1.0, "chosen"


def parse_record(rec: Any, file: str, line: int) -> PreferencePair:
    """One record in any accepted shape; raises ``_Bad(field, message)``."""
    if not isinstance(rec, dict):
        raise _Bad("", f"expected an object with 'chosen' and 'rejected', got {type(rec).__name__}")
    for k in ("chosen", "rejected"):
        if rec.get(k) is None:
            raise _Bad(k, "missing: every pair needs 'chosen' and 'rejected' (text, or chat messages)")
    prompt = rec.get("prompt", rec.get("messages"))
    chosen, rejected = rec["chosen"], rec["rejected"]
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            messages, chosen, rejected = _split_hh(chosen, rejected)
            shape = "hh_transcript"
        elif isinstance(chosen, list) and isinstance(rejected, list):
            messages, chosen, rejected = _split_implicit(chosen, rejected)
            shape = "trl_implicit"
        else:
            raise _Bad("prompt", "missing: give 'prompt' (text or chat messages), or make 'chosen' and "
                                 "'rejected' whole HH transcripts or whole conversations")
    else:
        messages, transcript = _prompt_messages(prompt)
        conversational = isinstance(chosen, list) or isinstance(rejected, list)
        chosen, rejected = _response(chosen, "chosen"), _response(rejected, "rejected")
        if transcript:  # TRL's HH text: responses start with the space after "Assistant:"
            chosen, rejected = chosen.strip(), rejected.strip()
        shape = ("hh_transcript" if transcript else "trl_conversational" if conversational
                 else "messages" if isinstance(prompt, list) else "trl_text")
    if not messages[-1]["content"].strip():
        raise _Bad("prompt", "the last user message is empty; fill it in or drop the row")
    if chosen == rejected:
        raise _Bad("rejected", "is the same text as 'chosen', so the pair carries no preference; drop the row")
    p, label_from = vote_share(rec)
    fields = {k: v for k, v in rec.items() if k not in {"prompt", "messages", "chosen", "rejected"}}
    subset = next((str(rec[k]) for k in SUBSET_FIELDS if rec.get(k) is not None), None)
    return PreferencePair(file, line, shape, messages, chosen, rejected, p, label_from,
                          None if rec.get("id") is None else str(rec["id"]), subset, fields)


# ---- reading files ----------------------------------------------------------------------------------
def _records(path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            return [], [Problem(str(path), None, "", f"not a readable Parquet file ({e})")]
        return [(i, {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(rows, 1)], []
    if suffix not in {".jsonl", ".ndjson", ".json"}:
        return [], [Problem(str(path), None, "", f"unsupported file type {suffix!r}: use .jsonl or .parquet")]
    records, problems = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(Problem(str(path), n, "", f"not valid JSON ({e.msg} at column {e.colno}): "
                                                          "one object per line; fix or remove the line"))
    return records, problems


def read_preferences(path: str | Path) -> tuple[list[PreferencePair], list[Problem]]:
    """Every pair of one file and every problem (nothing raised for bad rows)."""
    path = Path(path)
    if not path.exists():
        return [], [Problem(str(path), None, "", "no such file")]
    records, problems = _records(path)
    pairs = []
    for n, rec in records:
        try:
            pairs.append(parse_record(rec, str(path), n))
        except _Bad as e:
            problems.append(Problem(str(path), n, e.field, e.message))
    if not records and not problems:
        problems.append(Problem(str(path), None, "", "no rows"))
    return pairs, sorted(problems, key=lambda p: p.line or 0)


def source_name(path: str | Path, source: str | None = None) -> str:
    name = source or Path(path).stem
    if not _SOURCE_NAME.match(name):
        raise PreferenceImportError([Problem(str(path), None, "source", (
            f"{name!r} cannot name a source (letters, digits, '_', '.', '-'); pass --source NAME"))])
    return name


# ---- rows -----------------------------------------------------------------------------------------
def response_id(text: str) -> str:
    return content_hash("response", text)


def comparison_id(prompt_id: str, response_a_id: str, response_b_id: str, judge_name: str) -> str:
    return content_hash("human-comparison", prompt_id, response_a_id, response_b_id, judge_name)


def comparison_row(pair: PreferencePair, judge_name: str, prompt_id: str) -> dict[str, Any]:
    """The ``comparisons`` row of one person-labelled pair (the shared storage contract)."""
    a_id, b_id = response_id(pair.chosen), response_id(pair.rejected)
    params = {"source": judge_name[len(HUMAN_PREFIX):], "file": pair.file, "line": pair.line,
              "id": pair.external_id, "subset": pair.subset}
    raw = {"shape": pair.shape, "label_from": pair.label_from, "file": pair.file, "line": pair.line,
           "fields": pair.fields}
    return {"comparison_id": comparison_id(prompt_id, a_id, b_id, judge_name), "prompt_id": prompt_id,
            "pair_kind": HUMAN_METHOD, "response_a_id": a_id, "response_b_id": b_id,
            "response_a": pair.chosen, "response_b": pair.rejected, "principle_ids": None,
            "constitution_hash": None, "judge_name": judge_name, "judge_spec_hash": None,
            "judge_model_id": None, "judge_engine": None, "method": HUMAN_METHOD, "p_a_first": None,
            "p_a_swapped": None, "p_a": pair.p_chosen, "position_consistent": None, "score_a": None,
            "score_b": None, "raw_output": json.dumps(raw, ensure_ascii=False, default=str), "status": "ok",
            "reason": None, "seed": None, "params": json.dumps(params, ensure_ascii=False, default=str)}


def prompt_row(pair: PreferencePair, judge_name: str, prompt_id: str, test_fraction: float) -> dict[str, Any]:
    return {"prompt_id": prompt_id, "messages": json.dumps(pair.messages, ensure_ascii=False),
            "prompt_text": pair.messages[-1]["content"], "external_id": pair.external_id, "category": None,
            "tags": [HUMAN_TAG, judge_name], "split": assign_split(prompt_id, test_fraction),
            "source": pair.file, "source_line": pair.line,
            "meta": json.dumps({"human_preferences": judge_name}, ensure_ascii=False)}


def import_preferences(store: Store, files: list[str | Path], *, source: str | None = None,
                       test_fraction: float = 0.1) -> ImportSummary:
    """Check every file, then write all their pairs in one transaction (or nothing, on any bad row).

    ``source`` names the judge (``human:<source>``) for all files; by default each file's stem.
    New prompts get the deterministic split of ``cai ingest`` (``test_fraction`` held out), so a
    reward model trained on people's labels leaves the same prompts out as every other stage.
    """
    problems: list[Problem] = []
    per_file: list[tuple[str, list[PreferencePair]]] = []
    for f in files:
        try:
            judge_name = HUMAN_PREFIX + source_name(f, source)
        except PreferenceImportError as e:
            problems += e.problems
            continue
        pairs, bad = read_preferences(f)
        problems += bad
        per_file.append((judge_name, pairs))
    if problems:
        raise PreferenceImportError(problems)

    summary = ImportSummary([str(f) for f in files], sorted({j for j, _ in per_file}))
    prompts: dict[str, dict[str, Any]] = {}
    comparisons: dict[str, dict[str, Any]] = {}
    shapes: Counter[str] = Counter()
    for judge_name, pairs in per_file:
        for pair in pairs:
            pid = prompt_id_for(pair.messages)
            row = comparison_row(pair, judge_name, pid)
            summary.pairs += 1
            shapes[pair.shape] += 1
            if row["comparison_id"] in comparisons:
                summary.duplicates_in_file += 1
                continue
            comparisons[row["comparison_id"]] = row
            prompts.setdefault(pid, prompt_row(pair, judge_name, pid, test_fraction))
    summary.shapes = dict(shapes)
    run_id = store.start_run("ingest_preferences", {"files": summary.files, "source": source,
                                                    "test_fraction": test_fraction})
    stamp = now()
    for row in [*prompts.values(), *comparisons.values()]:
        row["run_id"], row["created_at"] = run_id, stamp
    try:
        with store.write() as con:  # one transaction: all of it or none
            summary.prompts_new = insert_rows(con, "prompts", list(prompts.values()))
            summary.comparisons_new = insert_rows(con, "comparisons", list(comparisons.values()))
    except BaseException as e:
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=repr(e))
        raise
    summary.comparisons_present = len(comparisons) - summary.comparisons_new
    summary.run_id = run_id
    store.finish_run(run_id, "ok", {k: v for k, v in summary.__dict__.items() if k != "run_id"})
    return summary
