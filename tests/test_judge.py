"""The AI judge: spec files, option-token discovery on real tokenizers, and the label arithmetic
of every method checked against log-probabilities computed independently with transformers."""

from __future__ import annotations

import math
import random
import textwrap
from pathlib import Path

import pytest

from cai.judge import (
    AnswerTokenError,
    Judge,
    PairInput,
    PrincipleRef,
    discover_answer_tokens,
    expected_rating,
    sample_principles,
    spec_answer_tokens,
)
from cai.judge_eval import compute_metrics, ece, reliability_bins
from cai.judge_spec import JudgeSpec, lint, load_judge_spec
from cai.yamlio import SpecError

REPO = Path(__file__).resolve().parent.parent
JUDGES = sorted((REPO / "judges").glob("*.yaml"))

PAIRS = [
    PairInput("p0", [{"role": "user", "content": "What is 2+2?"}], "It is 4.", "I don't know."),
    PairInput("p1", [{"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "Which kind?"},
                     {"role": "user", "content": "Any."}], "Blue.", "Colours are hard to name, sorry."),
    PairInput("p2", [{"role": "user", "content": "How do I boil an egg?"}],
              "Put it in boiling water for eight minutes.", "Eggs come from hens."),
]
PRINCIPLES = [PrincipleRef("correct", "Which response is more correct?", 1.0),
              PrincipleRef("kind", "Which response is kinder?", 3.0),
              PrincipleRef("brief", "Which response is more concise?", 0.5)]


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_tokenizer(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path)


@pytest.fixture(scope="module")
def tiny_engine(tiny_policy_dir):
    from cai.engines import make_engine

    return make_engine("transformers", str(tiny_policy_dir), batch_size=8, progress=False)


@pytest.fixture(scope="module")
def tiny_lm(tiny_policy_dir):
    """The same tiny model loaded on its own, to compute expected log-probabilities one prompt at a
    time (no batching, no padding) independently of the engine and the judge."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()

    def logprobs(text: str) -> torch.Tensor:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            return torch.log_softmax(lm(ids).logits[0, -1].float(), -1)

    return logprobs


def spec(method: str = "multiple-choice", **update) -> JudgeSpec:
    """A shipped spec with some fields changed (the tiny random model puts ~1/50k on any token,
    so the arithmetic tests switch the improbable-token check off with min_option_prob=0)."""
    s = load_judge_spec(REPO / "judges" / f"{method}.yaml")
    return s.model_copy(update={"min_option_prob": 0.0, **update})


def write(tmp_path: Path, text: str, name: str = "j.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ---- spec files --------------------------------------------------------------------------------
def test_shipped_judge_specs_are_valid():
    names = {p.stem for p in JUDGES}
    assert {"multiple-choice", "chain-of-thought", "score"} <= names
    for p in JUDGES:
        assert lint(p) == [], p
    methods = {load_judge_spec(p).method for p in JUDGES}
    assert methods == {"multiple_choice", "cot", "score", "pointwise", "contrast_likelihood"}
    cot = load_judge_spec(REPO / "judges" / "chain-of-thought.yaml")
    assert cot.effective_clamp == (0.4, 0.6) and cot.sampling is not None
    assert load_judge_spec(REPO / "judges" / "multiple-choice.yaml").both_orderings


def test_spec_hash_ignores_formatting_but_not_content(tmp_path):
    text = (REPO / "judges" / "multiple-choice.yaml").read_text()
    a = load_judge_spec(write(tmp_path, text, "a.yaml"))
    b = load_judge_spec(write(tmp_path, "# another comment\n" + text.replace("top_k: 20", "top_k:   20"), "b.yaml"))
    c = load_judge_spec(write(tmp_path, text.replace("top_k: 20", "top_k: 5"), "c.yaml"))
    assert a.hash == b.hash != c.hash


def test_spec_errors_name_file_line_and_field(tmp_path):
    bad = write(tmp_path, """\
        name: broken
        method: cot
        principles:
          mode: all
          k: 3
        prompt:
          template: "Compare {response_a} with {response_c}"
          answer_prefix: "("
        colour: blue
        top_k: 0
        """)
    with pytest.raises(SpecError) as e:
        load_judge_spec(bad)
    text = str(e.value)
    assert f"{bad}:5: principles.k: k applies to mode 'sample' only" in text
    assert f"{bad}:7: prompt.template: unknown placeholder {{response_c}}" in text
    assert f"{bad}:7: prompt.template: method cot needs the placeholder {{question}}" in text
    assert f"{bad}:6: prompt: method cot needs prompt.reasoning_prefix" in text
    assert "method cot needs a 'sampling' section" in text
    assert f"{bad}:9: colour: unknown key" in text
    assert f"{bad}:10: top_k:" in text


def test_score_spec_refuses_orderings_and_sampling(tmp_path):
    bad = write(tmp_path, """\
        name: s
        method: score
        both_orderings: true
        sampling: {temperature: 1.0}
        prompt:
          template: "{question} {response}"
          answer_prefix: "Rating: "
        """)
    problems = [str(p) for p in lint(bad)]
    assert any(f"{bad}:3: both_orderings: method score rates one response" in p for p in problems)
    assert any(f"{bad}:4: sampling: method score never samples" in p for p in problems)


def test_judge_lint_and_show_cli(tmp_path, tiny_policy_dir):
    import subprocess
    import sys

    cai = str(Path(sys.executable).parent / "cai")
    show = subprocess.run([cai, "judge", "show", "score", "--model", str(tiny_policy_dir)],
                          capture_output=True, text=True, cwd=tmp_path)  # found in the checkout from elsewhere
    assert show.returncode == 0, show.stderr
    assert load_judge_spec(REPO / "judges" / "score.yaml").hash in show.stdout
    assert "[33, 32]" in show.stdout  # "10" is "1", "0"
    ok = subprocess.run([cai, "judge", "lint", *map(str, JUDGES)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": ok") == len(JUDGES)
    bad = write(tmp_path, "name: x\nmethod: multiple_choice\nprompt:\n  template: '{question}'\n")
    out = subprocess.run([cai, "judge", "lint", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{bad}:3: prompt.answer_prefix: required field is missing" in out.stderr
    assert f"{bad}:4: prompt.template: method multiple_choice needs the placeholder {{response_a}}" in out.stderr


# ---- option-token discovery --------------------------------------------------------------------
def _ctx(tok, prefix: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) + prefix


@pytest.mark.parametrize(("prefix", "options", "ids", "append"), [
    ("The better response is (", ["A", "B"], [[49], [50]], ""),  # 'A' after '(' is token 49
    ("The better response is", [" A", " B"], [[330], [389]], ""),  # ' A' is one token, 330
    ("The better response is", [" (A", " (B"], [[49], [50]], " ("),  # shared ' (' moves into the prompt
])
def test_option_tokens_on_the_real_tokenizer(smol_tokenizer, prefix, options, ids, append):
    ans = discover_answer_tokens(smol_tokenizer, _ctx(smol_tokenizer, prefix), options)
    assert [ans.tokens[o] for o in options] == ids
    assert ans.root.edit.append == append and ans.root.edit.trim == 0
    assert not ans.root.children
    # The scored prompt really ends where the options begin: prompt tokens + option token = full text.
    prompt = ans.root.edit.apply(_ctx(smol_tokenizer, prefix))
    for o, i in zip(options, ids, strict=True):
        full = smol_tokenizer(_ctx(smol_tokenizer, prefix) + o, add_special_tokens=False)["input_ids"]
        assert smol_tokenizer(prompt, add_special_tokens=False)["input_ids"] + i == full


def test_ten_is_read_in_two_steps_on_the_real_tokenizer(smol_tokenizer):
    ans = discover_answer_tokens(smol_tokenizer, _ctx(smol_tokenizer, "Rating: "), [str(i) for i in range(1, 11)])
    one, zero = smol_tokenizer.convert_tokens_to_ids(["1", "0"])
    assert ans.tokens["10"] == [one, zero] and ans.tokens["1"] == [one]
    assert len(ans.root.candidates) == 9  # digits 1-9; "10" shares the "1"
    child = ans.root.children[one]
    assert child.candidates == [zero] and child.edit.append == "1"
    assert ans.root.ends[one] == 0 and child.ends[zero] == 9
    # arithmetic: P(10) = P(1) P(0|1), P(1) = P(1) (1 - P(0|1))
    lp_root = {t: math.log(0.05) for t in ans.root.candidates}
    lp_root[one] = math.log(0.4)
    probs = ans.option_probs([lp_root, {zero: math.log(0.25)}])
    assert probs[0] == pytest.approx(0.4 * 0.75) and probs[9] == pytest.approx(0.4 * 0.25)
    assert probs[1] == pytest.approx(0.05)


def test_shipped_specs_on_the_real_and_the_tiny_tokenizer(smol_tokenizer, tiny_policy_dir):
    from transformers import AutoTokenizer

    tiny_tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    for p in JUDGES:
        s = load_judge_spec(p)
        if s.method == "contrast_likelihood":  # reads the response's own tokens, no answer tokens
            continue
        real, tiny = spec_answer_tokens(s, smol_tokenizer), spec_answer_tokens(s, tiny_tok)
        assert real.tokens == tiny.tokens
        if s.pairwise:
            assert real.tokens == {"A": [49], "B": [50]}


def _merging_tokenizer():
    """A SentencePiece-style BPE tokenizer that has a merged '▁(A' token but no '▁(B'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("▁abcdefghijklmnopqrstuvwxyzABT(),.:")
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("▁", "("), ("▁(", "A"), ("i", "s"), ("▁", "is")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_option_merged_with_the_prefix_moves_the_answer_position_back():
    tok = _merging_tokenizer()
    ctx = "The answer is ("
    ans = discover_answer_tokens(tok, ctx, ["A", "B"])
    assert ans.pieces == {"A": ["▁(A"], "B": ["▁(", "B"]}
    assert ans.root.edit.trim == 2  # " (" removed: '▁(A' is read right after 'is'
    assert tok.convert_ids_to_tokens(ans.root.candidates) == ["▁(A", "▁("]
    child = ans.root.children[tok.convert_tokens_to_ids("▁(")]
    assert child.edit.trim == 0 and tok.convert_ids_to_tokens(child.candidates) == ["B"]
    # P(A) = P('▁(A'); P(B) = P('▁(') P('B' | '▁(')
    a_id, paren = tok.convert_tokens_to_ids(["▁(A", "▁("])
    probs = ans.option_probs([{a_id: math.log(0.3), paren: math.log(0.5)},
                              {tok.convert_tokens_to_ids("B"): math.log(0.6)}])
    assert probs == pytest.approx([0.3, 0.3])


def test_options_that_tokenise_alike_are_refused(smol_tokenizer):
    with pytest.raises(AnswerTokenError, match="at least two distinct"):
        discover_answer_tokens(smol_tokenizer, "x (", ["A", "A"])
    with pytest.raises(AnswerTokenError, match="adds no token"):
        discover_answer_tokens(smol_tokenizer, "x (", ["", "B"])


# ---- label arithmetic on the tiny model --------------------------------------------------------
def _option_probs(logprobs, ids):
    return [math.exp(logprobs[i].item()) for i in ids]


def _conversation_text(messages) -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def test_multiple_choice_is_the_softmax_over_option_logprobs_both_orderings(tiny_engine, tiny_lm):
    s = spec()
    judge = Judge(s, tiny_engine, PRINCIPLES[:1])
    verdicts = judge.judge(PAIRS)
    assert judge.calls == 1  # 3 pairs x 2 orderings in one batched score call
    ab = [49, 50]  # 'A', 'B' after '(' on the SmolLM2 tokenizer

    def probs(pair, first, second):
        text = s.fill(conversation=_conversation_text(pair.messages), question=PRINCIPLES[0].question,
                      response_a=first, response_b=second)
        prompt = tiny_engine.render([{"role": "user", "content": text}], assistant_prefix=s.prompt.answer_prefix)
        assert prompt.endswith("<|im_start|>assistant\nThe better response is (")
        return _option_probs(tiny_lm(prompt), ab)

    for pair, v in zip(PAIRS, verdicts, strict=True):
        assert v.status == "ok" and v.principle_ids == ["correct"]
        first = probs(pair, pair.response_a, pair.response_b)
        swapped = probs(pair, pair.response_b, pair.response_a)
        p_first = first[0] / (first[0] + first[1])
        p_swapped = 1 - swapped[0] / (swapped[0] + swapped[1])
        assert v.p_a_first == pytest.approx(p_first, abs=1e-4)
        assert v.p_a_swapped == pytest.approx(p_swapped, abs=1e-4)
        assert v.p_a == pytest.approx((p_first + p_swapped) / 2, abs=1e-4)
        assert v.position_consistent == ((p_first > 0.5) == (p_swapped > 0.5))
        assert v.raw["principles"][0]["option_probs"]["first"] == pytest.approx(first, rel=1e-3)


def test_swapping_the_pair_swaps_the_label(tiny_engine):
    judge = Judge(spec(), tiny_engine, PRINCIPLES[:1])
    fwd = judge.judge(PAIRS)
    back = judge.judge([PairInput(p.key, p.messages, p.response_b, p.response_a) for p in PAIRS])
    for f, b in zip(fwd, back, strict=True):
        # (b, a) shown in its 'swapped' order is exactly (a, b) shown first, and vice versa.
        assert b.p_a_swapped == pytest.approx(1 - f.p_a_first, abs=1e-5)
        assert b.p_a_first == pytest.approx(1 - f.p_a_swapped, abs=1e-5)
        assert b.p_a == pytest.approx(1 - f.p_a, abs=1e-5)
        assert b.position_consistent == f.position_consistent


def test_single_ordering_asks_once(tiny_engine):
    judge = Judge(spec(both_orderings=False), tiny_engine, PRINCIPLES[:1])
    _, queries = judge.build_queries(PAIRS)
    assert [q.view for q in queries] == ["first"] * len(PAIRS)
    both = Judge(spec(), tiny_engine, PRINCIPLES[:1]).judge(PAIRS)
    for v, ref in zip(judge.judge(PAIRS), both, strict=True):
        assert v.p_a_swapped is None and v.position_consistent is None
        assert v.p_a == pytest.approx(ref.p_a_first, abs=1e-5)


def test_ensemble_of_all_principles_is_the_weighted_mean(tiny_engine):
    from cai.judge_spec import PrincipleChoice

    judge = Judge(spec(principles=PrincipleChoice(mode="all")), tiny_engine, PRINCIPLES)
    verdicts = judge.judge(PAIRS)
    assert judge.calls == 1  # 3 pairs x 3 principles x 2 orderings, one call
    singles = {p.id: Judge(spec(), tiny_engine, [p]).judge(PAIRS) for p in PRINCIPLES}
    for i, v in enumerate(verdicts):
        assert v.principle_ids == ["correct", "kind", "brief"]
        per = {d["id"]: d for d in v.raw["principles"]}
        for p in PRINCIPLES:  # each principle's label is what judging with it alone gives
            assert per[p.id]["p"] == pytest.approx(singles[p.id][i].p_a, abs=1e-5)
            assert per[p.id]["weight"] == p.weight
        expected = sum(per[p.id]["p"] * p.weight for p in PRINCIPLES) / sum(p.weight for p in PRINCIPLES)
        assert v.p_a == pytest.approx(expected, abs=1e-9)
        assert v.p_a_first == pytest.approx(
            sum(per[p.id]["p_first"] * p.weight for p in PRINCIPLES) / 4.5, abs=1e-9)


def test_sampled_principles_are_seeded_per_pair_and_follow_weights(tiny_engine):
    from cai.judge_spec import PrincipleChoice

    s = spec(principles=PrincipleChoice(mode="sample", k=2))
    judge = Judge(s, tiny_engine, PRINCIPLES, seed=7)
    draws = [judge.choose_principles(f"pair-{i}") for i in range(300)]
    assert all(len(d) == 2 and d[0].id != d[1].id for d in draws)
    assert draws[5] == Judge(s, tiny_engine, PRINCIPLES, seed=7).choose_principles("pair-5")
    assert [d[0].id for d in draws[:20]] != [d[0].id for d in
                                            (Judge(s, tiny_engine, PRINCIPLES, seed=8).choose_principles(f"pair-{i}")
                                             for i in range(20))]
    first = [d[0].id for d in draws]
    # weights 1 : 3 : 0.5 -> 'kind' is drawn first most often, 'brief' least
    assert first.count("kind") > first.count("correct") > first.count("brief")
    v = judge.judge(PAIRS[:1])[0]
    assert v.principle_ids == [p.id for p in judge.choose_principles("p0")]
    assert v.p_a == pytest.approx(sum(d["p"] for d in v.raw["principles"]) / 2)  # sampled: plain mean


def test_weighted_sampling_without_replacement_frequencies():
    rng = random.Random(0)
    refs = [PrincipleRef("a", "?", 8.0), PrincipleRef("b", "?", 1.0), PrincipleRef("c", "?", 1.0)]
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(4000):
        counts[sample_principles(refs, 1, rng)[0].id] += 1
    assert counts["a"] / 4000 == pytest.approx(0.8, abs=0.03)
    assert sorted(p.id for p in sample_principles(refs, 5, rng)) == ["a", "b", "c"]


def test_score_method_expected_rating_reward_and_pairwise_label(tiny_engine, tiny_lm):
    s = spec("score")
    judge = Judge(s, tiny_engine, PRINCIPLES[:1])
    v = judge.judge(PAIRS[:1])[0]
    assert judge.calls == 2  # ratings 1-9 (and the "1"), then "0" after "1" for the 10
    digits = [tiny_engine.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    pair = PAIRS[0]
    ratings = {}
    for side, resp in (("a", pair.response_a), ("b", pair.response_b)):
        text = s.fill(conversation=f"Human: {pair.messages[0]['content']}", question=PRINCIPLES[0].question,
                      response=resp)
        prompt = tiny_engine.render([{"role": "user", "content": text}], assistant_prefix=s.prompt.answer_prefix)
        root = tiny_lm(prompt)
        p_zero = math.exp(tiny_lm(prompt + "1")[digits[0]].item())
        p = [math.exp(root[digits[r]].item()) for r in range(1, 10)]
        p.append(p[0] * p_zero)
        p[0] = p[0] * (1 - p_zero)
        e = sum((r + 1) * x for r, x in enumerate(p)) / sum(p)
        assert expected_rating(p) == pytest.approx(e)
        ratings[side] = e
        assert v.raw["principles"][0][f"rating_{side}"] == pytest.approx(e, abs=1e-4)
    assert v.score_a == pytest.approx((ratings["a"] - 5.5) / 4.5, abs=1e-4)
    assert v.score_b == pytest.approx((ratings["b"] - 5.5) / 4.5, abs=1e-4)
    assert -1 <= v.score_a <= 1
    assert v.p_a == pytest.approx(1 / (1 + math.exp(-(ratings["a"] - ratings["b"]) / s.score_tau)), abs=1e-4)
    assert v.p_a_first is None and v.position_consistent is None


def test_cot_reasons_then_reads_options_and_clamps(tiny_engine):
    from cai.judge_spec import Sampling

    s = spec("chain-of-thought", sampling=Sampling(temperature=1.0, max_tokens=6, seed=3), clamp=None)
    s = s.model_copy(update={"clamp": (0.0, 1.0)})
    free = Judge(s, tiny_engine, PRINCIPLES[:1])
    unclamped = free.judge(PAIRS[:2])
    assert free.calls == 2  # one generate call for all reasoning, one score call
    for v in unclamped:
        assert v.status == "ok"
        reasoning = v.raw["principles"][0]["reasoning"]
        assert set(reasoning) == {"first", "swapped"} and all(r.strip() for r in reasoning.values())
    # Same seed, same reasoning; now clamp to a band that excludes the first label.
    p0 = unclamped[0].p_a
    band = (p0 + 0.001, p0 + 0.01)
    clamped = Judge(s.model_copy(update={"clamp": band}), tiny_engine, PRINCIPLES[:1]).judge(PAIRS[:2])
    assert clamped[0].raw["principles"][0]["reasoning"] == unclamped[0].raw["principles"][0]["reasoning"]
    assert clamped[0].p_a == pytest.approx(band[0])
    assert clamped[0].raw["unclamped_p_a"] == pytest.approx(p0)
    for v in clamped:
        assert band[0] <= v.p_a <= band[1]
    # The shipped CoT spec clamps to [0.4, 0.6] by default.
    assert load_judge_spec(REPO / "judges" / "chain-of-thought.yaml").effective_clamp == (0.4, 0.6)


def test_invalid_outputs_are_recorded_with_a_reason(tiny_engine):
    # The random tiny model puts ~2e-5 on each option: below the shipped 0.01 threshold.
    v = Judge(load_judge_spec(REPO / "judges" / "multiple-choice.yaml"), tiny_engine, PRINCIPLES[:1]).judge(PAIRS)
    for x in v:
        assert x.status == "invalid" and x.reason == "both_tokens_improbable" and x.p_a is None
        assert sum(x.raw["principles"][0]["option_probs"]["first"]) < 0.01
    v = Judge(load_judge_spec(REPO / "judges" / "score.yaml"), tiny_engine, PRINCIPLES[:1]).judge(PAIRS[:1])
    assert v[0].status == "invalid" and v[0].reason == "rating_tokens_improbable"
    # A CoT judge whose reasoning matches a refusal pattern is invalid ("refusal").
    from cai.judge_spec import Sampling

    s = spec("chain-of-thought", sampling=Sampling(max_tokens=3, seed=1), refusal_patterns=[r"(?s)."])
    v = Judge(s, tiny_engine, PRINCIPLES[:1]).judge(PAIRS[:1])
    assert v[0].status == "invalid" and v[0].reason == "refusal"


def test_partly_invalid_ensemble_keeps_the_valid_principles(tiny_engine):
    from cai.judge_spec import PrincipleChoice

    # Threshold between the option mass of two principles' prompts: some principles pass, some not.
    s = spec(principles=PrincipleChoice(mode="all"))
    ref = Judge(s, tiny_engine, PRINCIPLES).judge(PAIRS[:1])[0]
    masses = sorted(min(sum(x) for x in d["option_probs"].values()) for d in ref.raw["principles"])
    assert masses[0] < masses[-1]
    cut = (masses[0] + masses[-1]) / 2
    v = Judge(s.model_copy(update={"min_option_prob": cut}), tiny_engine, PRINCIPLES).judge(PAIRS[:1])[0]
    ok = [d for d in v.raw["principles"] if d["status"] == "ok"]
    assert v.status == "ok" and 0 < len(ok) < 3 and v.raw["invalid_principles"]
    assert v.p_a == pytest.approx(sum(d["p"] * d["weight"] for d in ok) / sum(d["weight"] for d in ok))


# ---- judge-eval metrics ------------------------------------------------------------------------
def test_eval_metrics_arithmetic():
    items = [
        {"y": 1, "status": "ok", "p_a": 0.8, "p_a_first": 0.9, "p_a_swapped": 0.7, "position_consistent": True},
        {"y": 0, "status": "ok", "p_a": 0.6, "p_a_first": 0.9, "p_a_swapped": 0.3, "position_consistent": False},
        {"y": 0, "status": "ok", "p_a": 0.5, "p_a_first": 0.6, "p_a_swapped": 0.4, "position_consistent": False},
        {"y": 1, "status": "invalid", "p_a": None, "p_a_first": None, "p_a_swapped": None,
         "position_consistent": None},
    ]
    m, bins = compute_metrics(items, both_orderings=True)
    assert m["n"] == 4 and m["n_valid"] == 3 and m["invalid_rate"] == 0.25
    assert m["agreement"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["agreement_all_items"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert m["agreement_first_ordering"] == pytest.approx(1 / 3)
    assert m["agreement_swapped_ordering"] == pytest.approx(3 / 3)
    assert m["position_consistency"] == pytest.approx(1 / 3)
    assert m["first_position_rate"] == pytest.approx((3 + 2) / 6)
    assert m["brier"] == pytest.approx((0.04 + 0.36 + 0.25) / 3)
    assert set(bins) == {"both", "first_ordering"}
    ps, ys = [0.05, 0.15, 0.95, 0.95], [0, 1, 1, 0]
    assert [b["count"] for b in reliability_bins(ps, ys)] == [1, 1, 2]
    assert ece(ps, ys) == pytest.approx(0.25 * 0.05 + 0.25 * 0.85 + 0.5 * 0.45)


@pytest.mark.slow
def test_real_smollm2_multiple_choice_judge(smol_path):
    """The embedded model through the transformers engine: option tokens carry real mass, both
    orderings are read, and the label is their average."""
    import json

    from cai.engines import get_engine

    rows = [json.loads(line) for line in (REPO / "tests" / "data" / "labelled_pairs.jsonl").open()][:2]
    pairs = [PairInput(r["id"], r["prompt"] if isinstance(r["prompt"], list) else
                       [{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in rows]
    s = load_judge_spec(REPO / "judges" / "multiple-choice.yaml")
    judge = Judge(s, get_engine("transformers", smol_path, progress=False), None)
    for v in judge.judge(pairs):
        assert v.status == "ok", v.raw
        probs = v.raw["principles"][0]["option_probs"]
        assert all(sum(x) > s.min_option_prob for x in probs.values())
        assert v.p_a == pytest.approx((v.p_a_first + v.p_a_swapped) / 2)
        assert 0 < v.p_a < 1
