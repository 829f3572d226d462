"""Judge specification files (``judges/*.yaml``): how a pair of responses is labelled.

A spec names the judge model and engine, the method, how principles are chosen per pair, whether
both orderings are asked, the prompt template and the sampling settings. It is validated like a
constitution (``file:line: field: message``) and identified by the content hash of the validated
spec, which every comparison row records.

Methods
-------
``multiple_choice``
    The judge sees the conversation, the principle's question and the two responses as options
    (A) and (B). The prompt ends with an assistant prefix such as ``The better response is (`` so
    the next token is the answer. The label is the softmax over the log-probabilities of the two
    option tokens (no sampling).
``cot``
    The judge first writes its reasoning (sampled with ``sampling``) after ``reasoning_prefix``;
    then ``answer_prefix`` is appended and the option probabilities are read as above. The final
    label is clamped to ``clamp`` ([0.4, 0.6] by default, as the CAI paper does for CoT labels,
    because reasoning makes the judge over-confident). The reasoning is stored.
``score``
    The judge rates ONE response 1-10 under the principle. The expected rating under the
    probabilities of the rating tokens, normalised to [-1, 1], is a direct reward (d-RLAIF). A
    pairwise label follows from two ratings: ``P(A better) = sigmoid((E[A] - E[B]) / score_tau)``.

``pointwise``
    The judge reads ONE response and answers whether it violates the principle: the next-token
    probabilities of the two ``options`` (``[Yes, No]``: first = "violates") give its log-odds of
    violating, ``v = log P(yes) - log P(no)``. Pairwise: ``P(A better) = sigmoid((v_B - v_A) /
    score_tau)``; each response is read alone, so there is no position bias by construction. The
    direct reward is ``P(no) - P(yes)`` in [-1, 1]. The template gets ``{instruction}``, the
    principle's ``contrast.follow`` text (``default_follow`` without one), and ``{question}``.
``contrast_likelihood``
    No question at all: the per-token mean log-probability of the response after the prompt with
    the principle's ``contrast.follow`` system prompt minus the same with its ``contrast.violate``
    one (``default_follow`` / ``default_violate`` for principles without a block), read as prompt
    log-probs. ``P(A better) = sigmoid((s_A - s_B) / score_tau)``; the direct reward is
    ``tanh(s / score_tau)``. ``prompt`` is not used (leave it out).

Template placeholders (``{name}``; any other text, braces included, is kept verbatim):
``{conversation}`` the conversation so far, as ``Human: ...`` / ``Assistant: ...`` turns;
``{question}`` the principle's judge question (or ``default_question`` when no constitution);
``{response_a}``, ``{response_b}`` (pairwise methods) or ``{response}`` (score);
``{option_a}``, ``{option_b}`` the option labels (``A``, ``B`` by default).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cai.models import DEFAULT_MODEL
from cai.yamlio import Problem, SpecError, field_name, line_of, validate_file

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Method = Literal["multiple_choice", "cot", "score", "pointwise", "contrast_likelihood"]

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
PAIRWISE_FIELDS = {"conversation", "question", "response_a", "response_b", "option_a", "option_b"}
SCORE_FIELDS = {"conversation", "question", "response"}
POINTWISE_FIELDS = {"conversation", "question", "response", "instruction"}
REQUIRED_FIELDS: dict[str, set[str]] = {
    "multiple_choice": {"question", "response_a", "response_b"},
    "cot": {"question", "response_a", "response_b"},
    "score": {"question", "response"},
    "pointwise": {"response"},
}
DIRECT = {"score", "pointwise", "contrast_likelihood"}  # each response read alone
RATINGS = [str(i) for i in range(1, 11)]

DEFAULT_REFUSALS = [
    r"\bI (?:can(?:no|')t|am unable to|won't) (?:help|assist|answer|judge|evaluate|determine|choose)",
    r"\bI'?m sorry,? but I\b",
    r"\bAs an AI(?: language model)?, I (?:can(?:no|')t|do not|don't)",
]


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, description="System message; leave out to use the model's default.")
    template: Text = Field(description="The user message shown to the judge, with {placeholders}.")
    reasoning_prefix: str | None = Field(
        None, description="cot: the assistant turn starts with this, then the judge reasons.")
    answer_prefix: str = Field(
        description="Text right before the answer token, e.g. 'The better response is ('. For cot it "
                    "follows the reasoning; otherwise it starts the assistant turn.")


class Sampling(BaseModel):
    """How cot reasoning is sampled (multiple_choice and score read probabilities, never sample)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)


class PrincipleChoice(BaseModel):
    """Which principles judge a pair.

    ``sample``: ``k`` distinct principles drawn by weight, seeded per pair (the draw is recorded on
    the row); with k > 1 their labels are averaged. ``all``: every principle of the constitution,
    labels averaged with the principles' weights (an ensemble).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["sample", "all"] = "sample"
    k: int = Field(1, ge=1, description="Principles per pair in 'sample' mode.")


class JudgeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text
    description: str = ""
    method: Method
    model: str = Field(DEFAULT_MODEL, description="Judge model: built-in name, store model id, or HF folder.")
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    engine_options: dict[str, Any] = Field(default_factory=dict)
    principles: PrincipleChoice = Field(default_factory=PrincipleChoice)
    both_orderings: bool = Field(
        True, description="Ask each pair in both orders and average (pairwise methods).")
    default_question: Text = Field(
        "Which of these assistant responses is more helpful, honest and harmless?",
        description="Question used when no constitution is given (e.g. by judge-eval).")
    options: tuple[Text, Text] = Field(("A", "B"), description="Option labels, in display order.")
    prompt: PromptTemplate | None = Field(None, description="The judge's prompt (all methods but contrast_likelihood).")
    default_follow: Text = Field(
        "You are a helpful, honest and harmless assistant.",
        description="pointwise / contrast_likelihood: the follow instruction for principles without a contrast block.")
    default_violate: Text = Field(
        "You are an unhelpful, dishonest and harmful assistant.",
        description="contrast_likelihood: the violate instruction for principles without a contrast block.")
    sampling: Sampling | None = Field(None, description="Reasoning sampling (cot only).")
    top_k: int = Field(20, ge=1, le=100, description="Log-probabilities asked of top-k engines.")
    min_option_prob: float = Field(
        0.01, ge=0, lt=1,
        description="A query is invalid when the answer tokens' total probability is below this.")
    clamp: tuple[float, float] | None = Field(
        None, description="Clamp the final label to [lo, hi]; cot defaults to [0.4, 0.6].")
    score_tau: float = Field(1.0, gt=0, description="score: rating points per logit of the pairwise label.")
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSALS),
        description="cot: regular expressions that mark the reasoning as a refusal.")

    _path: str | None = None

    @property
    def hash(self) -> str:
        """Content hash of the validated spec (comments and formatting don't change it)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def pairwise(self) -> bool:
        return self.method not in DIRECT

    @property
    def effective_clamp(self) -> tuple[float, float] | None:
        if self.clamp is not None:
            return self.clamp
        return (0.4, 0.6) if self.method == "cot" else None

    def effective_sampling(self) -> Sampling:
        return self.sampling or Sampling()

    def fill(self, **values: str) -> str:
        """The template with its placeholders replaced (values are inserted verbatim)."""
        values = {"option_a": self.options[0], "option_b": self.options[1], **values}
        assert self.prompt is not None
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), self.prompt.template)


def _cross_field_problems(data: dict, file: str, lines: dict) -> list[Problem]:
    """Checks pydantic can't place on a line by itself: placeholders per method, cot settings."""
    problems: list[Problem] = []

    def add(loc: tuple, msg: str) -> None:
        problems.append(Problem(file, line_of(lines, loc), field_name(loc), msg))

    method = data.get("method")
    prompt = data.get("prompt") if isinstance(data.get("prompt"), dict) else {}
    template = prompt.get("template")
    if method == "contrast_likelihood":
        if "prompt" in data:
            add(("prompt",), "method contrast_likelihood asks no question; remove 'prompt'")
    elif method in REQUIRED_FIELDS and "prompt" not in data:
        add((), f"method {method} needs a 'prompt' section (template, answer_prefix)")
    if method in REQUIRED_FIELDS and isinstance(template, str):
        used = set(PLACEHOLDER.findall(template))
        allowed = {"score": SCORE_FIELDS, "pointwise": POINTWISE_FIELDS}.get(method, PAIRWISE_FIELDS)
        for name in sorted(used - allowed):
            add(("prompt", "template"),
                f"unknown placeholder {{{name}}} for method {method}; use {', '.join(sorted(allowed))}")
        for name in sorted(REQUIRED_FIELDS[method] - used):
            add(("prompt", "template"), f"method {method} needs the placeholder {{{name}}}")
    if method == "cot":
        if not prompt.get("reasoning_prefix"):
            add(("prompt", "reasoning_prefix") if "reasoning_prefix" in prompt else ("prompt",),
                "method cot needs prompt.reasoning_prefix, e.g. \"Let's think step by step:\"")
        if "sampling" not in data:
            add((), "method cot needs a 'sampling' section (temperature, max_tokens, seed)")
    elif "sampling" in data and method in ("multiple_choice", "score", "pointwise", "contrast_likelihood"):
        add(("sampling",), f"method {method} never samples; remove 'sampling'")
    if method in DIRECT and data.get("both_orderings") is True:
        add(("both_orderings",), f"method {method} rates one response at a time; orderings do not apply")
    clamp = data.get("clamp")
    if isinstance(clamp, list) and len(clamp) == 2 and all(isinstance(x, int | float) for x in clamp) \
            and not 0 <= clamp[0] < clamp[1] <= 1:
        add(("clamp",), "clamp must be [lo, hi] with 0 <= lo < hi <= 1")
    options = data.get("options")
    if isinstance(options, list) and len(options) == 2 and options[0] == options[1]:
        add(("options",), "the two options must differ")
    for i, pat in enumerate(data.get("refusal_patterns") or []):
        try:
            re.compile(str(pat))
        except re.error as e:
            add(("refusal_patterns", i), f"not a valid regular expression: {e}")
    choice = data.get("principles")
    if isinstance(choice, dict) and choice.get("mode") == "all" and "k" in choice:
        add(("principles", "k"), "k applies to mode 'sample' only; 'all' uses every principle")
    return problems


def load_judge_spec(path: str | Path) -> JudgeSpec:
    """Load and validate a judge spec; raise SpecError listing every problem as file:line."""
    path = Path(path)
    data_checks = _cross_field_problems
    spec, _ = validate_file(JudgeSpec, path, extra_checks=data_checks)
    if spec.method in DIRECT:
        spec = spec.model_copy(update={"both_orderings": False})
    spec._path = str(path)
    return spec


def lint(path: str | Path) -> list[Problem]:
    try:
        load_judge_spec(path)
    except SpecError as e:
        return e.problems
    return []


def json_schema() -> dict:
    schema = JudgeSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cai judge spec"
    return schema


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_judge_spec(name_or_path: str | Path, root: Path | None = None) -> Path:
    """'multiple-choice' -> judges/multiple-choice.yaml (here, else in the cai checkout); paths as is."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        return p
    for base in (root or Path.cwd(), REPO_ROOT):
        for cand in (base / "judges" / f"{p}.yaml", base / "judges" / f"{p}.yml"):
            if cand.exists():
                return cand
    raise FileNotFoundError(f"no judge spec {str(name_or_path)!r}: give a path or a name from judges/")
