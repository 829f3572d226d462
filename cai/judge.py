"""The AI judge: soft pairwise labels (and 1-10 ratings) read from a language model's next-token
probabilities, through any engine.

How a label is read
-------------------
The judge prompt is rendered with the engine's chat template and the assistant turn is pre-filled
with the spec's ``answer_prefix`` (e.g. ``The better response is (``), so the answer is the very
next token. Which token ids spell "A" and "B" *at that position* depends on the tokenizer ("A",
" A" and "(A" are different tokens, and some tokenizers merge "(" with the letter), so
:func:`discover_answer_tokens` tokenises ``prefix + option`` for each option and diffs it against
the tokens of the prefix alone:

* tokens the options share (e.g. a leading " (") are moved into the prompt;
* if an option merges with the end of the prefix (the tokenizer has a "(A" token), the answer
  position moves back to before the merged token and the candidates are the merged tokens;
* if an option is a prefix of another in tokens ("1" and "10" are "1" and "1","0" for SmolLM2),
  the answer is read in two steps: P("10") = P("1") P("0" | ..."1") and
  P("1") = P("1") (1 - P("0" | ..."1")); every step is one batched ``score_next_token`` call.

The result is checked by re-tokenising: the edited prompt must give exactly the expected tokens.

Labels
------
``multiple_choice``: P(first shown is better) = P(opt1) / (P(opt1) + P(opt2)), the softmax over the
two options' log-probabilities. With both orderings, P(A better) is averaged from the ordering
with A first and 1 - P(first better) of the swapped ordering. ``cot`` does the same after the
judge's own reasoning and clamps the final label (default [0.4, 0.6]). ``score``: the expected
rating E = sum r P(r) over r = 1..10 (renormalised over the ratings), reward (E - 5.5) / 4.5 in
[-1, 1], pairwise label sigmoid((E_a - E_b) / score_tau).

A query is invalid (and recorded so, with a reason) when the options' total probability at the
answer position is below ``min_option_prob`` ("both_tokens_improbable"; on top-k engines an
option outside the top k counts as probability 0), when a CoT judge refuses ("refusal") or writes
nothing ("unparsable"). A principle counts only when all its orderings are valid, so every label
that is kept is position-debiased; a pair is invalid when no principle counts.

``pointwise``: each response alone, "does it violate the principle?" read as the log-odds
v = log P(yes) - log P(no) of the two option tokens; P(A better) = sigmoid((v_B - v_A) / score_tau),
reward P(no) - P(yes). ``contrast_likelihood``: s = mean over the response's tokens of
log P(token | follow system prompt) - log P(token | violate system prompt), read as prompt
log-probs in one ``score_continuations`` call for all pairs x principles x (follow, violate);
P(A better) = sigmoid((s_A - s_B) / score_tau), reward tanh(s / score_tau). Neither has a
position to be biased by.

Principles: ``sample`` draws ``k`` distinct principles by weight, each principle's chance keyed by
(seed, pair key, its id) so that editing one principle moves no other pair's draw
(``cai.draws``), and averages their labels; ``all`` averages every principle with its weight.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cai.draws import weighted_draw
from cai.engines.base import Engine, SamplingParams, item_seed
from cai.judge_spec import RATINGS, JudgeSpec
from cai.store import content_hash

ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


class AnswerTokenError(ValueError):
    """The option tokens can't be placed at a stable position after the answer prefix."""


def format_conversation(messages: Sequence[dict[str, str]]) -> str:
    """Messages as plain ``Human: ...`` / ``Assistant: ...`` turns for the judge's prompt."""
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content'].strip()}"
                       for m in messages)


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _exp(lp: float | None) -> float:
    return 0.0 if lp is None or lp == -math.inf else math.exp(lp)


# ---- answer tokens -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptEdit:
    """How to turn a prompt that ends with the answer prefix into the prompt scored at one answer
    position: drop ``trim`` characters from its end, then append ``append``."""

    trim: int = 0
    append: str = ""

    def apply(self, text: str) -> str:
        return (text[:len(text) - self.trim] if self.trim else text) + self.append


@dataclass
class AnswerNode:
    """One position where next-token log-probabilities are read."""

    edit: PromptEdit
    candidates: list[int] = field(default_factory=list)  # token ids read here
    ends: dict[int, int] = field(default_factory=dict)  # token id -> option that ends with it
    children: dict[int, AnswerNode] = field(default_factory=dict)  # token id -> the next position


@dataclass
class AnswerTokens:
    options: list[str]
    root: AnswerNode
    tokens: dict[str, list[int]]  # option -> its token ids from the answer position on
    pieces: dict[str, list[str]]  # the same as token strings, for reports

    def nodes(self) -> list[AnswerNode]:
        """Every read position, parents before children."""
        out, queue = [], [self.root]
        while queue:
            node = queue.pop(0)
            out.append(node)
            queue.extend(node.children[t] for t in node.candidates if t in node.children)
        return out

    def option_probs(self, logprobs: Sequence[dict[int, float]]) -> list[float]:
        """P(option) for each option (not renormalised), from the log-probabilities read at
        ``self.nodes()`` (same order) for one prompt."""
        index = {id(n): i for i, n in enumerate(self.nodes())}
        probs = [0.0] * len(self.options)

        def walk(node: AnswerNode, mass: float) -> None:
            lps = logprobs[index[id(node)]]
            for tok in node.candidates:
                p = mass * _exp(lps.get(tok))
                child = node.children.get(tok)
                if child is not None:
                    if tok in node.ends:
                        cont = sum(_exp(logprobs[index[id(child)]].get(c)) for c in child.candidates)
                        probs[node.ends[tok]] += p * max(0.0, 1.0 - cont)
                    walk(child, p)
                elif tok in node.ends:
                    probs[node.ends[tok]] += p

        walk(self.root, 1.0)
        return probs


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def discover_answer_tokens(tokenizer: Any, context: str, options: Sequence[str]) -> AnswerTokens:
    """Find where and as which tokens each option is read after ``context`` (a rendered prompt
    that ends with the answer prefix). Works for any Hugging Face tokenizer; see the module doc."""
    options = list(options)
    if len(set(options)) != len(options) or len(options) < 2:
        raise AnswerTokenError(f"need at least two distinct options, got {options}")

    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    def dec(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    ctx_ids = enc(context)
    fulls = [enc(context + o) for o in options]
    d = min(_lcp(ctx_ids, f) for f in fulls)
    if any(f[:d] != fulls[0][:d] for f in fulls):  # cannot happen: all share ctx_ids[:d]
        raise AnswerTokenError("inconsistent tokenisation of the answer prefix")
    paths = [f[d:] for f in fulls]
    for o, p in zip(options, paths, strict=True):
        if not p:
            raise AnswerTokenError(f"option {o!r} adds no token after the answer prefix")
    if len({tuple(p) for p in paths}) != len(paths):
        raise AnswerTokenError(f"two options tokenise identically after the answer prefix: {options}")
    # Tokens every option starts with are part of the prompt, not of the answer.
    while all(len(p) > 1 for p in paths) and len({p[0] for p in paths}) == 1:
        d += 1
        paths = [p[1:] for p in paths]
    prefix = fulls[0][:d]

    def edit_candidates(ids: list[int]) -> list[PromptEdit]:
        """Ways to spell the prompt ending at token ``len(ids)`` as an edit of ``context``."""
        c = _lcp(ids, ctx_ids)
        out = [PromptEdit(trim=len(dec(ctx_ids[c:])) if c < len(ctx_ids) else 0, append=dec(ids[c:]))]
        # Decoding a slice on its own can drop a leading space (SentencePiece "▁"): decode prefixes.
        head = dec(ctx_ids[:c])
        full = dec(ids)
        if context.startswith(head) and full.startswith(head):
            out.append(PromptEdit(trim=len(context) - len(head), append=full[len(head):]))
        return out

    def edit_for(ids: list[int]) -> PromptEdit:
        got: list[int] = []
        for edit in edit_candidates(ids):
            got = enc(edit.apply(context))
            if got == ids:
                return edit
        raise AnswerTokenError(
            f"cannot read the options {options} at a stable token position after the answer prefix "
            f"{context[-40:]!r}: re-tokenising gives {got[-6:]} instead of {ids[-6:]}; "
            "change answer_prefix or the options")

    def build(ids: list[int], items: list[tuple[int, list[int]]]) -> AnswerNode:
        node = AnswerNode(edit=edit_for(ids))
        groups: dict[int, list[tuple[int, list[int]]]] = {}
        for i, path in items:
            groups.setdefault(path[0], []).append((i, path[1:]))
        for tok, group in groups.items():
            node.candidates.append(tok)
            for i, rest in group:
                if not rest:
                    node.ends[tok] = i
            longer = [(i, rest) for i, rest in group if rest]
            if longer:
                node.children[tok] = build([*ids, tok], longer)
        return node

    root = build(prefix, list(enumerate(paths)))
    return AnswerTokens(
        options=options, root=root,
        tokens={o: list(p) for o, p in zip(options, paths, strict=True)},
        pieces={o: tokenizer.convert_ids_to_tokens(list(p)) for o, p in zip(options, paths, strict=True)},
    )


# ---- label arithmetic -------------------------------------------------------------------------
def pairwise_label(p_options: Sequence[float]) -> float:
    """P(first shown is better): the softmax over the two options' log-probabilities."""
    total = p_options[0] + p_options[1]
    return p_options[0] / total if total > 0 else 0.5


def expected_rating(p_ratings: Sequence[float]) -> float:
    """E[rating] over 1..10 with the ratings' probabilities renormalised."""
    total = sum(p_ratings)
    if total <= 0:
        raise ValueError("no probability on any rating")
    return sum((i + 1) * p for i, p in enumerate(p_ratings)) / total


def violation_logodds(p_options: Sequence[float]) -> float:
    """pointwise: log P(yes, violates) - log P(no), floored so a zero probability stays finite."""
    return math.log(max(p_options[0], 1e-12)) - math.log(max(p_options[1], 1e-12))


def rating_to_reward(e: float) -> float:
    """[1, 10] -> [-1, 1]."""
    return (e - 5.5) / 4.5


def clamp(p: float, bounds: tuple[float, float] | None) -> float:
    return p if bounds is None else min(max(p, bounds[0]), bounds[1])


def consistent(p_first: float | None, p_swapped: float | None) -> bool | None:
    """Do the two orderings prefer the same response?"""
    if p_first is None or p_swapped is None:
        return None
    side = [(p > 0.5) - (p < 0.5) for p in (p_first, p_swapped)]
    return side[0] == side[1]


def sample_principles(principles: Sequence[PrincipleRef], k: int, rng: random.Random) -> list[PrincipleRef]:
    """``k`` distinct principles drawn in proportion to their weights (Efraimidis-Spirakis)."""
    keyed = sorted(principles, key=lambda p: rng.random() ** (1.0 / p.weight), reverse=True)
    return keyed[:min(k, len(keyed))]


def choose_principles(spec: JudgeSpec, principles: Sequence[PrincipleRef], seed: int,
                      pair_key: str) -> list[PrincipleRef]:
    """The principles a pair is judged by: all of them, or ``k`` drawn by weight with a draw that
    depends only on (seed, pair, each principle's id), so an edit to one principle moves no other
    pair's draw (``cai.draws``; what ``cai label --changed`` relies on)."""
    if spec.principles.mode == "all":
        return list(principles)
    return weighted_draw(principles, spec.principles.k, ("principles", seed, pair_key),
                         ident=lambda p: p.id, weight=lambda p: p.weight)


# ---- the judge ---------------------------------------------------------------------------------
def judge_conversation(spec: JudgeSpec, user: str) -> list[dict[str, str]]:
    conv = [{"role": "system", "content": spec.prompt.system}] if spec.prompt.system else []
    return [*conv, {"role": "user", "content": user}]


def probe_context(spec: JudgeSpec, render: Callable[..., str]) -> str:
    """A rendered prompt of the same shape as the real ones (``render`` is ``Engine.render``), for
    answer-token discovery."""
    if spec.pairwise:
        user = spec.fill(conversation="Human: Hi", question="Which is better?",
                         response_a="Hello.", response_b="Hi there.")
    elif spec.method == "pointwise":
        user = spec.fill(conversation="Human: Hi", question="Is it polite?", response="Hello.",
                         instruction=spec.default_follow)
    else:
        user = spec.fill(conversation="Human: Hi", question="Is it polite?", response="Hello.")
    conv = judge_conversation(spec, user)
    if spec.method == "cot":
        return (render(conv, assistant_prefix=spec.prompt.reasoning_prefix or "")
                + " Both answers are short." + spec.prompt.answer_prefix)
    return render(conv, assistant_prefix=spec.prompt.answer_prefix)


def spec_answer_tokens(spec: JudgeSpec, tokenizer: Any) -> AnswerTokens:
    """The answer tokens a spec reads with this tokenizer (no model needed)."""
    def render(conv: list[dict[str, str]], assistant_prefix: str = "") -> str:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return text + assistant_prefix

    if spec.method == "contrast_likelihood":
        raise ValueError("method contrast_likelihood reads no answer tokens (it scores the response itself)")
    options = list(spec.options) if spec.method != "score" else list(RATINGS)
    return discover_answer_tokens(tokenizer, probe_context(spec, render), options)


@dataclass(frozen=True)
class PrincipleRef:
    id: str
    question: str
    weight: float = 1.0
    follow: str | None = None  # the principle's contrast block (pointwise, contrast_likelihood)
    violate: str | None = None


@dataclass
class PairInput:
    key: str  # stable identity of the pair: seeds the principle draw
    messages: list[dict[str, str]]
    response_a: str
    response_b: str | None  # None: one response only (Judge.score_responses)


@dataclass
class Verdict:
    principle_ids: list[str]
    p_a_first: float | None  # P(A better), A shown first (mean over principles)
    p_a_swapped: float | None  # P(A better), A shown second
    p_a: float | None  # final soft label
    position_consistent: bool | None
    status: str  # ok | invalid
    reason: str | None
    score_a: float | None = None  # score method: reward in [-1, 1]
    score_b: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Query:
    pair: int
    principle: int  # index into the pair's principle list
    view: str  # first | swapped (pairwise) or a | b (score)
    conversation: list[dict[str, str]]
    base: str = ""  # rendered prompt ending with the answer prefix
    reasoning: str | None = None
    invalid: str | None = None
    probs: list[float] | None = None
    value: float | None = None  # contrast_likelihood: mean log-prob difference per token


class Judge:
    """Labels pairs with a judge spec through an engine, in one batched call per read position."""

    def __init__(self, spec: JudgeSpec, engine: Engine, principles: Sequence[PrincipleRef] | None = None,
                 *, seed: int = 0):
        self.spec = spec
        self.engine = engine
        self.seed = seed
        self.principles = list(principles) if principles else [
            PrincipleRef("default", spec.default_question, 1.0)]
        self._refusals = [re.compile(p, re.IGNORECASE) for p in spec.refusal_patterns]
        self.options = list(spec.options) if spec.method != "score" else list(RATINGS)
        self.answer = (discover_answer_tokens(engine.tokenizer, self._probe_context(), self.options)
                       if spec.method != "contrast_likelihood" else None)
        self.calls = 0  # engine calls made (generate + score), for tests and benchmarks

    # ---- prompts -------------------------------------------------------------------------------
    def _conversation(self, user: str) -> list[dict[str, str]]:
        return judge_conversation(self.spec, user)

    def _probe_context(self) -> str:
        return probe_context(self.spec, self.engine.render)

    def choose_principles(self, pair_key: str) -> list[PrincipleRef]:
        return choose_principles(self.spec, self.principles, self.seed, pair_key)

    def build_queries(self, pairs: Sequence[PairInput]) -> tuple[list[list[PrincipleRef]], list[_Query]]:
        chosen = [self.choose_principles(p.key) for p in pairs]
        conversation = [format_conversation(p.messages) for p in pairs]
        queries = []
        for i, pair in enumerate(pairs):
            for j, pr in enumerate(chosen[i]):
                if self.spec.pairwise:
                    views = [("first", pair.response_a, pair.response_b)]
                    if self.spec.both_orderings:
                        views.append(("swapped", pair.response_b, pair.response_a))
                    for view, x, y in views:
                        user = self.spec.fill(conversation=conversation[i], question=pr.question,
                                              response_a=x.strip(), response_b=y.strip())
                        queries.append(_Query(i, j, view, self._conversation(user)))
                elif self.spec.method == "contrast_likelihood":
                    for view, x in (("a", pair.response_a), ("b", pair.response_b)):
                        if x is not None:
                            queries.append(_Query(i, j, view, pair.messages, base=x))
                else:
                    for view, x in (("a", pair.response_a), ("b", pair.response_b)):
                        if x is None:  # score_responses: one response per "pair"
                            continue
                        user = self.spec.fill(conversation=conversation[i], question=pr.question,
                                              response=x.strip(),
                                              instruction=pr.follow or self.spec.default_follow)
                        queries.append(_Query(i, j, view, self._conversation(user)))
        return chosen, queries

    # ---- engine calls --------------------------------------------------------------------------
    def _reason(self, queries: list[_Query], seed: int, keys: Sequence[tuple[Any, ...]] = ()) -> None:
        """``keys``: one identity per query (pair key, principle, view); each query's sample is then
        seeded by its identity, not its position, so a pair reasons the same in any batch or shard."""
        s = self.spec.effective_sampling()
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                seed=seed, stop=tuple(s.stop),
                                request_seeds=tuple(item_seed(seed, *k) for k in keys))
        prefix = self.spec.prompt.reasoning_prefix or ""
        prompts = [self.engine.render(q.conversation, assistant_prefix=prefix) for q in queries]
        outs = self.engine.generate(prompts, params)
        self.calls += 1
        for q, prompt, out in zip(queries, prompts, outs, strict=True):
            text = out[0].text.rstrip()
            q.reasoning = text
            q.base = prompt + text + self.spec.prompt.answer_prefix
            if not text.strip():
                q.invalid = "unparsable"
            elif any(r.search(text) for r in self._refusals):
                q.invalid = "refusal"

    def _likelihood(self, chosen: list[list[PrincipleRef]], queries: list[_Query]) -> None:
        """contrast_likelihood: one prompt log-prob call for every query x (follow, violate)."""
        prompts, conts = [], []
        for q in queries:
            pr = chosen[q.pair][q.principle]
            msgs = [m for m in q.conversation if m["role"] != "system"]
            for instr in (pr.follow or self.spec.default_follow, pr.violate or self.spec.default_violate):
                prompts.append(self.engine.render([{"role": "system", "content": instr}, *msgs]))
                conts.append(q.base.strip())
        lps = self.engine.score_continuations(prompts, conts)
        self.calls += 1
        for k, q in enumerate(queries):
            follow, violate = lps[2 * k], lps[2 * k + 1]
            # The two prompts differ only before the response, so the response has the same tokens
            # under both; the mean over them keeps long answers from dominating.
            # An empty response has no tokens to read: no evidence either way (0).
            n = min(len(follow), len(violate))
            q.value = (sum(follow[:n]) - sum(violate[:n])) / n if n else 0.0

    def _read(self, queries: list[_Query]) -> None:
        """One ``score_next_token`` call per answer position over all queries."""
        nodes = self.answer.nodes()
        per_node = []
        for node in nodes:
            prompts = [node.edit.apply(q.base) for q in queries]
            per_node.append(self.engine.score_next_token(prompts, node.candidates, top_k=self.spec.top_k))
            self.calls += 1
        for k, q in enumerate(queries):
            q.probs = self.answer.option_probs([res[k] for res in per_node])
            if q.invalid is None and sum(q.probs) < self.spec.min_option_prob:
                q.invalid = "rating_tokens_improbable" if self.spec.method == "score" else "both_tokens_improbable"

    def judge(self, pairs: Sequence[PairInput], *, seed_offset: int = 0) -> list[Verdict]:
        """Label a batch of pairs (all pairs x principles x orderings in one engine call each)."""
        if not pairs:
            return []
        chosen, queries = self.build_queries(pairs)
        if self.spec.method == "contrast_likelihood":
            self._likelihood(chosen, queries)
            return self._group(pairs, chosen, queries)
        if self.spec.method == "cot":
            self._reason(queries, self.spec.effective_sampling().seed + seed_offset,
                         [(pairs[q.pair].key, chosen[q.pair][q.principle].id, q.view) for q in queries])
        else:
            for q in queries:
                q.base = self.engine.render(q.conversation, assistant_prefix=self.spec.prompt.answer_prefix)
        self._read(queries)
        return self._group(pairs, chosen, queries)

    def _group(self, pairs: Sequence[PairInput], chosen: list[list[PrincipleRef]],
               queries: list[_Query]) -> list[Verdict]:
        by_pair: list[list[_Query]] = [[] for _ in pairs]
        if pairs and pairs[0].response_b is None:
            return by_pair  # type: ignore[return-value]  # score_responses reads the queries itself
        for q in queries:
            by_pair[q.pair].append(q)
        return [self._verdict(chosen[i], by_pair[i]) for i in range(len(pairs))]

    def score_responses(self, conversations: Sequence[Sequence[dict[str, str]]],
                        responses: Sequence[str]) -> list[float | None]:
        """d-RLAIF: each response's direct reward in [-1, 1] (mean over its principles), batched in
        one engine call per read position; None where the judge's read is invalid."""
        if self.spec.pairwise:
            raise ValueError(f"judge {self.spec.name!r} (method {self.spec.method}) compares two responses; "
                             "a direct reward needs method score, pointwise or contrast_likelihood")
        pairs = [PairInput(content_hash("response", list(c), r), list(c), r, None)
                 for c, r in zip(conversations, responses, strict=True)]
        if not pairs:
            return []
        chosen, queries = self.build_queries(pairs)
        if self.spec.method == "contrast_likelihood":
            self._likelihood(chosen, queries)
        else:
            for q in queries:
                q.base = self.engine.render(q.conversation, assistant_prefix=self.spec.prompt.answer_prefix)
            self._read(queries)
        out: list[list[tuple[float, float]]] = [[] for _ in pairs]
        weighted = self.spec.principles.mode == "all"
        for q in queries:
            if q.invalid:
                continue
            w = chosen[q.pair][q.principle].weight if weighted else 1.0
            if self.spec.method == "contrast_likelihood":
                r = math.tanh(q.value / self.spec.score_tau)
            elif self.spec.method == "pointwise":
                r = -math.tanh(violation_logodds(q.probs) / 2)
            else:
                r = rating_to_reward(expected_rating(q.probs))
            out[q.pair].append((r, w))
        return [sum(r * w for r, w in xs) / sum(w for _, w in xs) if xs else None for xs in out]

    # ---- aggregation ---------------------------------------------------------------------------
    def _verdict(self, principles: list[PrincipleRef], queries: list[_Query]) -> Verdict:
        spec = self.spec
        weighted = spec.principles.mode == "all"
        details: list[dict[str, Any]] = []
        for j, pr in enumerate(principles):
            qs = {q.view: q for q in queries if q.principle == j}
            d: dict[str, Any] = {"id": pr.id, "weight": pr.weight if weighted else 1.0,
                                 "option_probs": {v: [float(f"{x:.6g}") for x in q.probs or []] for v, q in qs.items()}}
            bad = [q for q in qs.values() if q.invalid]
            if spec.method == "cot":
                d["reasoning"] = {v: q.reasoning for v, q in qs.items()}
            if bad:
                d.update(status="invalid", reason=bad[0].invalid)
            elif spec.pairwise:
                first = pairwise_label(qs["first"].probs)
                swapped = 1.0 - pairwise_label(qs["swapped"].probs) if "swapped" in qs else None
                p = first if swapped is None else (first + swapped) / 2
                d.update(status="ok", p_first=first, p_swapped=swapped, p=p,
                         consistent=consistent(first, swapped))
            elif spec.method == "pointwise":
                va, vb = violation_logodds(qs["a"].probs), violation_logodds(qs["b"].probs)
                d.update(status="ok", logodds_a=va, logodds_b=vb, reward_a=-math.tanh(va / 2),
                         reward_b=-math.tanh(vb / 2), p=sigmoid((vb - va) / spec.score_tau))
            elif spec.method == "contrast_likelihood":
                sa, sb = qs["a"].value, qs["b"].value
                d.update(status="ok", contrast_a=sa, contrast_b=sb, reward_a=math.tanh(sa / spec.score_tau),
                         reward_b=math.tanh(sb / spec.score_tau), p=sigmoid((sa - sb) / spec.score_tau))
            else:
                ea, eb = expected_rating(qs["a"].probs), expected_rating(qs["b"].probs)
                d.update(status="ok", rating_a=ea, rating_b=eb, reward_a=rating_to_reward(ea),
                         reward_b=rating_to_reward(eb), p=sigmoid((ea - eb) / spec.score_tau))
            details.append(d)

        ok = [d for d in details if d["status"] == "ok"]
        raw: dict[str, Any] = {"principles": details}
        ids = [pr.id for pr in principles]
        if not ok:
            return Verdict(ids, None, None, None, None, "invalid", details[0]["reason"], raw=raw)

        def mean(key: str) -> float | None:
            vals = [(d[key], d["weight"]) for d in ok if d.get(key) is not None]
            if not vals:
                return None
            return sum(v * w for v, w in vals) / sum(w for _, w in vals)

        p = mean("p")
        clamped = clamp(p, spec.effective_clamp)
        if clamped != p:
            raw["unclamped_p_a"] = p
        if len(ok) < len(details):
            raw["invalid_principles"] = [d["id"] for d in details if d["status"] != "ok"]
        if spec.pairwise:
            p_first, p_swapped = mean("p_first"), mean("p_swapped")
            return Verdict(ids, p_first, p_swapped, clamped, consistent(p_first, p_swapped), "ok", None, raw=raw)
        return Verdict(ids, None, None, clamped, None, "ok", None,
                       score_a=mean("reward_a"), score_b=mean("reward_b"), raw=raw)


class DirectJudge:
    """The d-RLAIF reward adapter for ``cai ppo --reward judge:SPEC``: ``score`` returns the
    1-10 scale PPO's JudgeReward expects (5.5 + 4.5 x the direct reward; an invalid read is 5.5,
    i.e. reward 0)."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self.spec = judge.spec

    def score(self, conversations: Sequence[Sequence[dict[str, str]]], responses: Sequence[str]) -> list[float]:
        rewards = self.judge.score_responses(conversations, responses)
        return [5.5 + 4.5 * (r if r is not None else 0.0) for r in rewards]


def load_judge(spec_name: str, *, constitution: str | None = None, model: str | None = None,
               engine: str | None = None, engine_options: dict[str, Any] | None = None,
               seed: int = 0) -> DirectJudge:
    """A judge spec (path or name under judges/) ready to score single responses.

    ``constitution``: judge by its principles (sampled per response as the spec says); default:
    the spec's default question and follow / violate instructions.
    """
    from cai.label import find_constitution, judge_engine, load_spec, principle_refs
    from cai.models import resolve

    spec = load_spec(spec_name)
    if spec.pairwise:
        raise ValueError(f"judge {spec.name!r} (method {spec.method}) compares two responses; a d-RLAIF reward "
                         "needs method score, pointwise or contrast_likelihood (e.g. judge:score)")
    refs = principle_refs(find_constitution(constitution)) if constitution else None
    eng = judge_engine(spec, resolve(model or spec.model), engine, engine_options)
    return DirectJudge(Judge(spec, eng, refs, seed=seed))
