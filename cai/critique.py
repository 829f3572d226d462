"""Stage 2 (SL-CAI): critique each initial response by a sampled principle, then revise it; repeat.

For every selected generation the stage runs ``rounds`` rounds. Round ``r``:

1. samples one principle from the constitution, in proportion to its ``weight``, with a draw
   keyed by ``(seed, generation id, r, principle id)`` (``cai.draws``): a re-run draws the same
   principles whatever else is in the batch, and an edit to one principle moves no other draw;
2. asks for a critique. The conversation is, as in the CAI paper (Bai et al. 2022, §3)::

       [few-shot examples from the constitution, each one worked round as earlier turns]
       user: <prompt>            assistant: <initial response>
       user: <critique request of round 1>   assistant: <critique 1>
       user: <revision request of round 1>   assistant: <revision 1>
       ...                                   (every earlier round whose revision was ok)
       user: <critique request of round r>   assistant: ▌

3. appends the critique and the principle's revision request and asks for the revision;
4. cleans known artefacts out of the revision (``cai.cleaning``), classifies it (``ok``,
   ``empty``, ``unchanged``, ``too_long``, ``copied_critique``) and writes one ``revisions`` row
   with the principle, constitution hash, both requests, raw and cleaned texts, status, reason,
   model, sampling parameters and seeds.

A round whose revision is not ``ok`` is kept in the table but not carried into later rounds: the
next round critiques the last good response again. The ``sl_cai`` view picks, per generation,
the last ``ok`` round as the training target.

Batching: all pending generations of a chunk (``batch_size``, default large) go through round
``r`` together: one ``engine.chat`` call for all their critiques, one for all their revisions,
then one short write. Resumable: a revision's id is ``hash(generation, round, constitution,
model, critique settings)``; a re-run reads which rounds exist and runs only the missing ones
(round ``r`` is built on the stored rows of rounds ``< r``). Principle choices and sampling seeds
come from (seed, generation id, round), never from a row's position, so a re-run, a resumed run
or the union of ``--shard I/N`` runs samples exactly what one uninterrupted run does; each row
records the seeds it was sampled with.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cai.cleaning import classify_revision, clean_critique, clean_revision
from cai.constitution import Constitution, Example, Principle, load_constitution, resolve_constitution
from cai.draws import weighted_draw
from cai.engines import Engine, SamplingParams, get_engine, item_seed
from cai.models import DEFAULT_MODEL, resolve_in_store
from cai.sharding import ShardField, shard_note, take_shard
from cai.store import Store, content_hash

Message = dict[str, str]

# Seeds of the engine calls: round r's critiques and revisions start 10_000_019 apart (a prime larger
# than any chunk), so their requests' seeds (base + i, see ``cai.engines.base.sample_seed``) never
# meet. Engines seed in [0, 2**32): torch's CPU generator ignores the higher bits.
_SEED_STRIDE = 10_000_019
_SEED_MOD = 1 << 32


class CritiqueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    constitution: str = Field("constitutions/harmless.yaml", description="Path or name under constitutions/.")
    model: str = Field(DEFAULT_MODEL, description="The model that critiques and revises (usually the policy).")
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="e.g. base_url for openai")
    rounds: int = Field(2, ge=1, description="Critique-revision rounds per generation.")
    few_shot: int | None = Field(None, ge=0, description="Constitution examples placed first (None: all of them).")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    critique_max_tokens: int = Field(128, ge=1)
    revision_max_tokens: int = Field(256, ge=1)
    seed: int = Field(0, description="Seeds the principle draws and the sampling.")
    max_context: int = Field(4096, ge=256, description="Prompt + new tokens must fit: few-shot examples, then "
                                                       "the oldest rounds, are left out of longer conversations.")
    # Status limits (they decide a row's status, not what is sampled; not part of the ids).
    max_revision_chars: int | None = Field(4000, ge=1, description="Longer revisions are 'too_long'.")
    max_growth: float | None = Field(4.0, gt=0, description="Revisions more than this many times as long as the "
                                                           "response they revise are 'too_long'.")
    # Which generations.
    generation_stage: str = "initial"
    generation_model: str | None = Field(None, description="Only generations of this model id.")
    split: Literal["train", "test"] | None = Field(None, description="Only prompts of this split.")
    category: str | None = None
    limit: int | None = Field(None, ge=1, description="At most this many generations (stable order).")
    batch_size: int = Field(256, ge=1, description="Generations per chunk; a chunk's round is one engine call "
                                                   "for the critiques, one for the revisions, one write.")
    shard: ShardField = Field(None, description="I/N: only shard I of N (by generation id); see cai.sharding.")
    changed: bool = Field(False, description="Only generations revised under an older version of the constitution: "
                                             "carry the rounds an edit did not touch, redo the rest (cai.relabel).")

    def critique_params(self, seed: int = 0) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.critique_max_tokens,
                              seed=seed)

    def revision_params(self, seed: int = 0) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.revision_max_tokens,
                              seed=seed)

    def identity(self, constitution: Constitution) -> dict[str, Any]:
        """What shapes the model's output besides the generation, round, constitution and model."""
        return {"critique": self.critique_params(self.seed).hash(), "revision": self.revision_params(self.seed).hash(),
                "few_shot": n_examples(constitution, self.few_shot), "max_context": self.max_context}

    def params_hash(self, constitution: Constitution) -> str:
        return content_hash("critique-params", self.identity(constitution), length=12)


# ---- principles and ids ------------------------------------------------------------------------
def pick_principle(constitution: Constitution, seed: int, generation_id: str, round_: int) -> Principle:
    """The principle of one round: a weighted draw keyed by (seed, generation, round, principle id),
    so editing one principle moves no other round's draw (``cai.draws``; ``cai critique --changed``)."""
    return weighted_draw(constitution.principles, 1, ("principle", seed, generation_id, round_),
                         ident=lambda p: p.id, weight=lambda p: p.weight)[0]


def revision_id(generation_id: str, round_: int, constitution_hash: str, model_id: str, params_hash: str) -> str:
    return content_hash("revision", generation_id, round_, constitution_hash, model_id, params_hash)


def call_seed(seed: int, round_: int, phase: Literal["critique", "revision"], chunk_start: int) -> int:
    """Base seed of one engine call (request ``i`` of the call is sampled with this + i)."""
    k = 2 * round_ - (1 if phase == "critique" else 0)
    return (seed + chunk_start + k * _SEED_STRIDE) % _SEED_MOD


# ---- conversations ------------------------------------------------------------------------------
def n_examples(constitution: Constitution, few_shot: int | None) -> int:
    return len(constitution.examples) if few_shot is None else min(few_shot, len(constitution.examples))


def example_turns(constitution: Constitution, examples: list[Example], fallback: Principle) -> list[Message]:
    """Few-shot examples as earlier turns: prompt, response, critique request, critique, revision
    request, revision. An example that names no principle uses the requests of ``fallback``."""
    turns: list[Message] = []
    for ex in examples:
        p = constitution.principle(ex.principle) if ex.principle else fallback
        turns += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response},
                  {"role": "user", "content": p.critique}, {"role": "assistant", "content": ex.critique},
                  {"role": "user", "content": p.revision}, {"role": "assistant", "content": ex.revision}]
    return turns


def critique_conversation(prompt_messages: list[Message], response: str, earlier: list[dict[str, Any]],
                          principle: Principle, few_shot: list[Message] | None = None) -> list[Message]:
    """The conversation that asks for round ``len(earlier) + 1``'s critique.

    ``earlier``: the carried rounds, each with ``critique_request``, ``critique``,
    ``revision_request`` and ``revision``. System messages of the prompt stay first; the few-shot
    turns come right after them.
    """
    system = [m for m in prompt_messages if m["role"] == "system"]
    rest = [m for m in prompt_messages if m["role"] != "system"]
    conv = [*system, *(few_shot or []), *rest, {"role": "assistant", "content": response}]
    for r in earlier:
        conv += [{"role": "user", "content": r["critique_request"]}, {"role": "assistant", "content": r["critique"]},
                 {"role": "user", "content": r["revision_request"]}, {"role": "assistant", "content": r["revision"]}]
    conv.append({"role": "user", "content": principle.critique})
    return conv


def revision_conversation(critique_conv: list[Message], critique: str, principle: Principle) -> list[Message]:
    return [*critique_conv, {"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision}]


# ---- state of one generation --------------------------------------------------------------------
@dataclass
class Pending:
    generation_id: str
    prompt_id: str
    messages: list[Message]
    initial: str
    ids: list[str]  # revision id of round 1..R
    carried: list[dict[str, Any]] = field(default_factory=list)  # earlier ok rounds, oldest first
    next_round: int = 1  # R + 1: done

    @property
    def current(self) -> str:
        return self.carried[-1]["revision"] if self.carried else self.initial

    @property
    def current_id(self) -> str | None:
        return self.carried[-1]["revision_id"] if self.carried else None

    def record(self, row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            self.carried.append(row)
        self.next_round = row["round"] + 1


def select_generations(store: Store, cfg: CritiqueConfig) -> list[dict[str, Any]]:
    where, args = ["g.stage = ?"], [cfg.generation_stage]
    for column, value in (("g.model_id", cfg.generation_model), ("p.split", cfg.split), ("p.category", cfg.category)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    sql = ("SELECT g.generation_id, g.prompt_id, g.text, p.messages FROM generations g JOIN prompts p USING (prompt_id) "
           "WHERE " + " AND ".join(where) +
           " ORDER BY p.created_at, p.source, p.source_line, g.prompt_id, g.sample_index, g.generation_id")
    if cfg.limit:
        sql += f" LIMIT {int(cfg.limit)}"
    rows = store.query(sql, args)
    for r in rows:
        r["messages"] = json.loads(r["messages"])
    return rows


_CARRY_COLUMNS = ["revision_id", "generation_id", "round", "principle_id", "critique_request", "critique",
                  "revision_request", "revision", "status"]


def existing_rounds(store: Store, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Stored revisions rows among ``ids`` (the columns a later round needs), by revision id."""
    if not ids or not store.path.exists():
        return {}
    import pyarrow as pa

    with store.read() as con:
        con.register("_ids", pa.table({"id": ids}))
        cur = con.execute(f"SELECT {', '.join(_CARRY_COLUMNS)} FROM revisions WHERE revision_id IN (SELECT id FROM _ids)")
        return {r[0]: dict(zip(_CARRY_COLUMNS, r, strict=True)) for r in cur.fetchall()}


def plan(store: Store, cfg: CritiqueConfig, constitution: Constitution, model_id: str) -> list[Pending]:
    """Every selected generation with its stored rounds loaded and its next missing round set."""
    gens = take_shard(select_generations(store, cfg), cfg.shard, lambda g: g["generation_id"])
    phash = cfg.params_hash(constitution)
    out = [Pending(g["generation_id"], g["prompt_id"], g["messages"], g["text"] or "",
                   [revision_id(g["generation_id"], r, constitution.hash, model_id, phash)
                    for r in range(1, cfg.rounds + 1)]) for g in gens]
    have = existing_rounds(store, [i for p in out for i in p.ids])
    for p in out:
        for rid in p.ids:
            if rid not in have:
                break
            p.record(have[rid])
    return out


# ---- fitting the context ---------------------------------------------------------------------------
def fit(engine: Engine, few_shot: list[Message], build, budget: int) -> tuple[list[Message], list[str]]:
    """``build(few_shot, drop_rounds)`` -> conversation; leave out few-shot examples (6 turns each),
    then the oldest carried rounds, until the rendered prompt has at most ``budget`` tokens."""
    notes: list[str] = []
    shots, drop = list(few_shot), 0
    while True:
        conv, n_rounds = build(shots, drop)
        n_tokens = len(engine.tokenizer(engine.render(conv), add_special_tokens=False)["input_ids"])
        if n_tokens <= budget:
            break
        if shots:
            shots = shots[:-6]
            notes.append("few-shot example left out to fit the context")
        elif drop < n_rounds:
            drop += 1
            notes.append("oldest round left out to fit the context")
        else:
            notes.append(f"prompt has {n_tokens} tokens > budget {budget}")
            break
    return conv, sorted(set(notes))


# ---- the stage -------------------------------------------------------------------------------------
def compute_critique(cfg: CritiqueConfig, constitution: Constitution, model_id: str, model_path: str,
                     todo: list[Pending], *, engine: Engine | None = None,
                     stats: dict[str, Any] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Revision rows for the missing rounds of ``todo``, one list per chunk and round; no store
    access (a Ray worker can run it). Rows lack ``run_id`` and ``created_at`` (the writer's)."""
    engine = engine or get_engine(cfg.engine, model_path, **cfg.engine_options)
    stats = stats if stats is not None else {}
    params_hash = cfg.params_hash(constitution)
    examples = constitution.examples[:n_examples(constitution, cfg.few_shot)]
    budget = cfg.max_context - cfg.critique_max_tokens - cfg.revision_max_tokens
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start:start + cfg.batch_size]
        for round_ in range(1, cfg.rounds + 1):
            active = [p for p in chunk if p.next_round == round_]
            if not active:
                continue
            # 1. principles and critique prompts
            principles = [pick_principle(constitution, cfg.seed, p.generation_id, round_) for p in active]
            convs, notes = [], []
            for p, principle in zip(active, principles, strict=True):
                shots = example_turns(constitution, examples, principle)

                def build(s, drop, p=p, principle=principle):
                    earlier = p.carried[drop:]
                    return critique_conversation(p.messages, p.initial, earlier, principle, s), len(p.carried)

                conv, note = fit(engine, shots, build, budget)
                convs.append(conv)
                notes.append(note)
            # 2. one engine call for every critique of this round, then one for every revision; each
            # request is seeded by its generation id (not its position), so a resumed or sharded
            # run samples exactly what an uninterrupted one does.
            c_base, r_base = call_seed(cfg.seed, round_, "critique", 0), call_seed(cfg.seed, round_, "revision", 0)
            c_params = replace(cfg.critique_params(c_base),
                               request_seeds=tuple(item_seed(c_base, p.generation_id) for p in active))
            r_params = replace(cfg.revision_params(r_base),
                               request_seeds=tuple(item_seed(r_base, p.generation_id) for p in active))
            t0 = time.time()
            critiques = [c[0] for c in engine.chat(convs, c_params)]
            cleaned_critiques = [clean_critique(c.text, request=pr.critique).text
                                 for c, pr in zip(critiques, principles, strict=True)]
            rev_convs = [revision_conversation(conv, crit, pr)
                         for conv, crit, pr in zip(convs, cleaned_critiques, principles, strict=True)]
            revisions = [c[0] for c in engine.chat(rev_convs, r_params)]
            stats["engine_seconds"] = stats.get("engine_seconds", 0.0) + time.time() - t0
            # 3. clean, classify
            rows = []
            for i, (p, pr) in enumerate(zip(active, principles, strict=True)):
                crit, rev = critiques[i], revisions[i]
                cleaned = clean_revision(rev.text, critique=cleaned_critiques[i], request=pr.revision)
                status, reason = classify_revision(
                    cleaned.text, previous=p.current, critique=cleaned_critiques[i],
                    finish_reason=rev.finish_reason, max_tokens=cfg.revision_max_tokens,
                    max_chars=cfg.max_revision_chars, max_growth=cfg.max_growth, rules=cleaned.rules)
                if notes[i]:
                    reason = "; ".join([*([reason] if reason else []), *notes[i]])
                seeds = {"critique_seed": c_params.sample_seed(i), "revision_seed": r_params.sample_seed(i)}
                rows.append({
                    "revision_id": p.ids[round_ - 1], "generation_id": p.generation_id, "round": round_,
                    "principle_id": pr.id, "constitution_hash": constitution.hash,
                    "critique_request": pr.critique, "critique": cleaned_critiques[i], "raw_critique": crit.text,
                    "revision_request": pr.revision, "revision": cleaned.text, "raw_revision": rev.text,
                    "cleaning": cleaned.rules, "status": status, "reason": reason,
                    "parent_revision_id": p.current_id, "critique_tokens": crit.num_tokens,
                    "revision_tokens": rev.num_tokens, "finish_reason": rev.finish_reason,
                    "model_id": model_id, "engine": cfg.engine, "seed": seeds["revision_seed"],
                    "params": json.dumps({"critique": c_params.to_dict() | {"seed": seeds["critique_seed"]},
                                          "revision": r_params.to_dict() | {"seed": seeds["revision_seed"]},
                                          "few_shot": len(examples), "max_context": cfg.max_context,
                                          "max_revision_chars": cfg.max_revision_chars,
                                          "max_growth": cfg.max_growth}),
                    "params_hash": params_hash,
                })
            # The next round builds on this one whether or not the writer has stored it yet.
            for p, row in zip(active, rows, strict=True):
                p.record(row)
            yield rows


def start_critique_run(store: Store, cfg: CritiqueConfig, constitution: Constitution, model_id: str,
                       model_path: str) -> str:
    run_id = store.start_run("critique", {**cfg.model_dump(), "constitution_hash": constitution.hash,
                                          "params_hash": cfg.params_hash(constitution)})
    with store.write() as con:
        store.register_constitution(constitution, con=con)
        store.register_model(model_id, "base", model_path, con=con)
    return run_id


def run_critique(store: Store, cfg: CritiqueConfig, *, engine: Engine | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Fill ``revisions`` for the selected generations (missing rounds only); returns a summary."""
    from cai.generate import write_rows

    started = time.time()
    constitution = load_constitution(resolve_constitution(cfg.constitution))
    model_id, model_path = resolve_in_store(store, cfg.model)
    pending = plan(store, cfg, constitution, model_id)
    if not pending:
        raise LookupError(f"no generations in {store.path} match (stage {cfg.generation_stage!r}"
                          + (f", model {cfg.generation_model!r}" if cfg.generation_model else "")
                          + "); run `cai generate` first")
    carried: list[dict[str, Any]] = []
    if cfg.changed:
        from cai.relabel import carry_critique

        pending, carried, changed = carry_critique(store, cfg, constitution, model_id, pending)
    todo = [p for p in pending if p.next_round <= cfg.rounds]
    rounds_left = sum(cfg.rounds - p.next_round + 1 for p in todo)
    summary: dict[str, Any] = {
        "generations": len(pending), "rounds": cfg.rounds, "constitution_hash": constitution.hash,
        "model_id": model_id, "engine": cfg.engine, "params_hash": cfg.params_hash(constitution),
        "already_done": len(pending) * cfg.rounds - rounds_left - len(carried), "revised": 0, "status": {},
        **shard_note(cfg.shard),
    }
    if cfg.changed:
        summary["changed"] = changed
    if not todo and not carried:
        summary["seconds"] = round(time.time() - started, 2)
        return summary

    # Build the engine before writing anything: a bad engine must leave no run row or model behind.
    engine = engine or get_engine(cfg.engine, model_path, **cfg.engine_options)
    run_id = start_critique_run(store, cfg, constitution, model_id, model_path)
    if carried:
        summary["carried"] = store.insert("revisions", [{**r, "run_id": run_id} for r in carried])
    if not todo:
        summary["seconds"] = round(time.time() - started, 2)
        store.finish_run(run_id, "ok", summary)
        return summary
    statuses: Counter[str] = Counter()
    tokens, stats = 0, {}
    bar = tqdm(total=rounds_left, desc=f"critique ({cfg.engine})", unit="revision", disable=not progress)
    try:
        for rows in compute_critique(cfg, constitution, model_id, model_path, todo, engine=engine, stats=stats):
            summary["revised"] += write_rows(store, "revisions", rows, run_id)
            for row in rows:
                statuses[row["status"]] += 1
                tokens += row["critique_tokens"] + row["revision_tokens"]
            bar.update(len(rows))
    except BaseException as e:
        summary["status"] = dict(statuses)
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                         summary, error=repr(e))
        raise
    finally:
        bar.close()
    engine_seconds = stats.get("engine_seconds", 0.0)
    summary["status"] = dict(statuses)
    summary["tokens"] = tokens
    summary["seconds"] = round(time.time() - started, 2)
    summary["engine_seconds"] = round(engine_seconds, 2)
    summary["revisions_per_second"] = round(summary["revised"] / engine_seconds, 3) if engine_seconds else None
    store.finish_run(run_id, "ok", summary)
    return summary


def critique_report(store: Store, constitution_hash: str | None = None) -> list[dict[str, Any]]:
    """Per principle: rounds, how many were ok / empty / unchanged / too long / other (``critique_report``)."""
    if constitution_hash:
        return store.query("SELECT * FROM critique_report WHERE constitution_hash = ?", [constitution_hash])
    return store.query("SELECT * FROM critique_report")
