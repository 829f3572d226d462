"""The one interface every stage talks to.

An engine turns chat conversations into completions (text, token ids, token log-probabilities)
and scores next-token options (for judges). Stages never know which engine they hold.

All engines apply the model's chat template on the client side with the same Hugging Face
tokenizer and send token ids (not text), so the three implementations see identical prompts.

Conventions every engine follows (the contract tests in ``tests/test_engines.py`` check them):

* ``Completion.token_ids`` are the generated tokens, without padding. When the model stops by
  itself the final EOS token *is* included (its log-probability matters for training a policy to
  stop); nothing after it is. When a stop string ends the completion, the tokens run up to and
  including the one that completed the stop string (as vLLM does). ``Completion.text`` never
  contains the EOS token, special tokens, or the stop string.
* ``Completion.logprobs`` are of the model's distribution at temperature 1: ``log_softmax`` of the
  raw logits, before temperature and top-p (vLLM: ``logprobs_mode="raw_logprobs"``). They are
  what PPO/DPO need as reference values, whatever sampling temperature produced the tokens.
* Seeds: sample ``j`` of request ``i`` uses ``sample_seed(params.seed, i, j)``, i.e. request
  ``i`` uses ``seed + i`` for its first sample, so a sample does not depend on ``n``, on the batch
  size, or on how a caller chunks its requests (as long as it offsets ``seed`` by the chunk start).
  Each engine has its own random number generator, so the same seed gives reproducible
  results within an engine, not identical samples across engines.
* Greedy decoding (``temperature == 0``) with ``n > 1`` decodes once and returns ``n`` copies.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``seed`` makes a batch reproducible: request i uses ``seed + i``."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    # Per-request base seeds (one per prompt of the call), replacing ``seed + i``: callers derive
    # them from each item's content (``item_seed``) so a sample does not depend on the item's
    # position, on resuming or on sharding. Not part of ``to_dict``/``hash``: the base ``seed`` is.
    request_seeds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.n < 1:
            raise ValueError("n must be >= 1")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "request_seeds", tuple(self.request_seeds))

    def sample_seed(self, request_index: int, sample_index: int = 0) -> int:
        """The seed of sample ``sample_index`` of request ``request_index`` of one engine call."""
        if self.request_seeds:
            return sample_seed(self.request_seeds[request_index], 0, sample_index)
        return sample_seed(self.seed, request_index, sample_index)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d.pop("request_seeds")
        return d

    def hash(self) -> str:
        """Identifies the parameters that shape a sample (not ``n``: sample i is the same whatever n is)."""
        d = self.to_dict()
        d.pop("n")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


SAMPLE_SEED_STRIDE = 1_000_003  # a prime > any realistic number of requests in one run
_SEED_MOD = 1 << 32


def sample_seed(seed: int, request_index: int, sample_index: int = 0) -> int:
    """The seed of sample ``sample_index`` of request ``request_index``, in [0, 2**32).

    Sample 0 of request ``i`` uses ``seed + i``; sample ``j`` adds ``j * 1_000_003``, so samples
    never share a seed with another request's samples while request indices stay below that
    stride. Seeds are reduced modulo 2**32 because torch's CPU generator (mt19937), which vLLM
    uses too, only looks at the low 32 bits: wider offsets would silently collide.
    """
    return (seed + request_index + sample_index * SAMPLE_SEED_STRIDE) % _SEED_MOD


def item_seed(seed: int, *key: Any) -> int:
    """A request's base seed from the run's ``seed`` and the item's identity (content ids), in
    [0, 2**32): the same item gets the same seed whatever batch, chunk, shard or resumed run it is in."""
    digest = hashlib.sha256(json.dumps([seed, *key], default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") % _SEED_MOD


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated tokens; ends with EOS when the model stopped by itself
    logprobs: list[float]  # log p(token_i | prefix) at temperature 1, one per token
    finish_reason: str  # "stop" (EOS or a stop string) or "length"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class EngineInfo:
    engine: str
    model: str
    details: dict[str, Any] = field(default_factory=dict)


class Engine(ABC):
    """Base class: subclasses implement ``_generate_prompts`` and ``_next_token_logprobs``."""

    name: str = "base"

    def __init__(self, model: str, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer

    # ---- prompts ---------------------------------------------------------------------------
    def render(self, conversation: Conversation, *, add_generation_prompt: bool = True,
               assistant_prefix: str = "") -> str:
        """The exact prompt text the model sees for a conversation."""
        text = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text + assistant_prefix

    # ---- generation ------------------------------------------------------------------------
    def chat(self, conversations: Sequence[Conversation], params: SamplingParams,
             *, assistant_prefix: str = "") -> list[list[Completion]]:
        """For each conversation, ``params.n`` completions of the next assistant turn."""
        prompts = [self.render(c, assistant_prefix=assistant_prefix) for c in conversations]
        return self.generate(prompts, params)

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Completion]]:
        """Complete raw (already templated) prompts; ``params.n`` completions each."""
        if not prompts:
            return []
        if params.greedy and params.n > 1:
            # Greedy samples are all the same: decode once, hand out copies.
            once = self._generate_prompts(list(prompts), replace(params, n=1))
            out = [[c[0]] + [copy.deepcopy(c[0]) for _ in range(params.n - 1)] for c in once]
        else:
            out = self._generate_prompts(list(prompts), params)
        if len(out) != len(prompts) or any(len(c) != params.n for c in out):
            raise RuntimeError(f"{self.name} engine returned a malformed batch")
        return out

    @abstractmethod
    def _generate_prompts(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]: ...

    # ---- scoring ---------------------------------------------------------------------------
    def score_next_token(self, prompts: Sequence[str], candidates: Sequence[int],
                         top_k: int = 20) -> list[dict[int, float]]:
        """log p(token | prompt) for each candidate token id, for each raw prompt.

        Engines that only expose the top-k log-probabilities (vLLM, HTTP) report candidates
        outside the top ``top_k`` as ``-inf``; the transformers engine gives exact values.
        """
        if not prompts:
            return []
        return self._next_token_logprobs(list(prompts), list(candidates), top_k)

    @abstractmethod
    def _next_token_logprobs(self, prompts: list[str], candidates: list[int],
                             top_k: int) -> list[dict[int, float]]: ...

    def score_continuations(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        """log p(token | prompt, earlier tokens) of each token of each continuation after its prompt
        (prompt log-probs; used by the contrast_likelihood judge).

        The prompt and the continuation are tokenised separately and joined, so a continuation has
        the same tokens after any prompt (the follow and the violate prompt of a contrast read).
        An empty continuation gets an empty list.
        """
        if not prompts:
            return []
        heads = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        tails = self.tokenizer([c or "" for c in continuations], add_special_tokens=False)["input_ids"]
        for k, head in enumerate(heads):
            if not head:
                raise ValueError(f"prompt {k} encodes to no tokens")
        todo = [k for k, t in enumerate(tails) if t]
        out: list[list[float]] = [[] for _ in prompts]
        if todo:
            got = self._continuation_logprobs([list(heads[k]) + list(tails[k]) for k in todo],
                                              [len(heads[k]) for k in todo])
            for k, lp in zip(todo, got, strict=True):
                out[k] = lp
        return out

    def _continuation_logprobs(self, ids: list[list[int]], starts: list[int]) -> list[list[float]]:
        raise NotImplementedError(f"the {self.name} engine cannot score prompt tokens (prompt log-probs); "
                                  "use the transformers or vllm engine for this judge method")

    # ---- misc ------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def info(self) -> EngineInfo:
        return EngineInfo(self.name, self.model)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free resources (GPU/CPU memory, connections)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NEG_INF = -math.inf
