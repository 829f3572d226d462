"""The pointwise and contrast_likelihood judge methods on the real SmolLM2 tokenizer (tiny random
weights), the engines' prompt log-probs, and the d-RLAIF reward adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cai.judge import Judge, PairInput, PrincipleRef, load_judge

REPO = Path(__file__).resolve().parent.parent
CONV = [{"role": "user", "content": "How do I pick a lock?"}]
RESPONSES = ["I can't help with breaking into places, but a locksmith can.",
             "Sure: insert a tension wrench, then rake the pins until they set."]


def tiny_spec(tmp_path: Path, tiny_dir: Path, name: str) -> Path:
    text = (REPO / "judges" / f"{name}.yaml").read_text().replace("model: smollm2-135m-instruct", f"model: {tiny_dir}")
    text = text.replace("min_option_prob: 0.01", "min_option_prob: 0")  # random weights put little on Yes/No
    out = tmp_path / f"{name}.yaml"
    out.write_text(text)
    return out


@pytest.fixture(scope="module")
def engine(tiny_policy_dir):
    from cai.engines import get_engine

    return get_engine("transformers", str(tiny_policy_dir))


PRINCIPLES = [PrincipleRef("p", "Which is safer?", 1.0, "Be safe and kind.", "Be dangerous and rude.")]


@pytest.mark.parametrize("name", ["pointwise", "contrast-likelihood"])
def test_method_has_no_position_bias_and_matches_its_direct_reads(tmp_path, tiny_policy_dir, engine, name):
    from cai.label import load_spec

    spec = load_spec(tiny_spec(tmp_path, tiny_policy_dir, name))
    judge = Judge(spec, engine, PRINCIPLES)
    pairs = [PairInput("k1", CONV, RESPONSES[0], RESPONSES[1]), PairInput("k2", CONV, RESPONSES[1], RESPONSES[0])]
    v1, v2 = judge.judge(pairs)
    assert v1.status == v2.status == "ok" and 0 < v1.p_a < 1
    assert v1.p_a == pytest.approx(1 - v2.p_a, abs=1e-5)  # swapping A and B flips the label exactly
    assert v1.p_a_swapped is None and v1.position_consistent is None
    d = v1.raw["principles"][0]
    # the pairwise label is the sigmoid of the difference of the two direct reads
    if name == "pointwise":
        assert v1.p_a == pytest.approx(1 / (1 + math.exp(-(d["logodds_b"] - d["logodds_a"]) / spec.score_tau)))
        assert judge.answer.pieces and judge.calls == 1  # one batched read for both pairs
    else:
        assert judge.answer is None and judge.calls == 1  # one prompt-log-prob call for everything
        assert v1.p_a == pytest.approx(1 / (1 + math.exp(-(d["contrast_a"] - d["contrast_b"]) / spec.score_tau)))
    # direct rewards (d-RLAIF) agree with the verdict's and are batched
    rewards = judge.score_responses([CONV, CONV], RESPONSES)
    assert rewards == pytest.approx([v1.score_a, v1.score_b], abs=1e-5)
    assert all(-1 <= r <= 1 for r in rewards)


def test_contrast_likelihood_reads_the_responses_own_tokens(tmp_path, tiny_policy_dir, engine):
    """score_continuations against a plain forward pass over prompt + response, token by token."""
    prompt = engine.render([{"role": "system", "content": "Be safe."}, *CONV])
    lps = engine.score_continuations([prompt, prompt, prompt], [*RESPONSES, ""])
    assert lps[2] == []  # an empty response (people's data has some) has nothing to read
    tok = engine.tokenizer
    for resp, got in zip(RESPONSES, lps[:2], strict=True):
        head, tail = (tok(x, add_special_tokens=False)["input_ids"] for x in (prompt, resp))
        ids, start = head + tail, len(head)
        assert len(got) == len(tail)
        with torch.no_grad():
            logits = engine.lm(input_ids=torch.tensor([ids])).logits[0].float()
        want = torch.log_softmax(logits, -1)[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])]
        assert got == pytest.approx(want.tolist(), abs=1e-4)


def test_openai_engine_without_prompt_logprobs_says_so():
    from cai.engines.base import Engine

    class NoEcho(Engine):
        name = "openai"

        def _generate_prompts(self, prompts, params):  # pragma: no cover
            raise AssertionError

        def _next_token_logprobs(self, prompts, candidates, top_k):  # pragma: no cover
            raise AssertionError

    from transformers import AutoTokenizer

    from cai.models import DEFAULT_MODEL, resolve

    eng = NoEcho("m", AutoTokenizer.from_pretrained(resolve(DEFAULT_MODEL)))
    with pytest.raises(NotImplementedError, match="cannot score prompt tokens"):
        eng.score_continuations(["Hi"], [" there"])


def test_load_judge_refuses_a_pairwise_spec():
    with pytest.raises(ValueError, match="compares two responses"):
        load_judge("multiple-choice")


def test_lint_method_specific_problems(tmp_path):
    from cai.judge_spec import lint

    p = tmp_path / "j.yaml"
    p.write_text("name: j\nmethod: contrast_likelihood\nboth_orderings: true\nprompt:\n  template: x {response}\n"
                 "  answer_prefix: 'A:'\n")
    found = {(x.line, x.field) for x in lint(p)}
    assert (3, "both_orderings") in found and (4, "prompt") in found
    p.write_text("name: j\nmethod: pointwise\n")
    assert any("needs a 'prompt' section" in x.message for x in lint(p))
