"""Engine over any OpenAI-compatible server (``vllm serve``, or vLLM's
``python -m vllm.entrypoints.openai.api_server``), with plain httpx: no ``openai`` package needed.

It uses the legacy ``/v1/completions`` endpoint with prompts given as token-id lists (rendered
with our own tokenizer), so the server sees exactly the tokens the other engines see.

Requests:
* Greedy generation and next-token scoring send ``prompts_per_request`` prompts per HTTP request
  (the completions API takes a list of prompts).
* Sampled generation sends one request per sample, because the API takes one ``seed`` per request
  and every sample has its own seed (``params.sample_seed(i, j)``). The server batches the
  concurrent requests itself.
* At most ``max_concurrency`` requests are in flight (a thread pool); connection errors, 429 and
  5xx answers are retried ``retries`` times with exponential back-off (honouring ``Retry-After``).

vLLM extensions, sent unless ``vllm_extensions=False`` (for servers that reject unknown fields):
``return_token_ids`` and ``return_tokens_as_token_ids`` (exact output token ids), and
``logprob_token_ids`` (exact log-probabilities of the candidate tokens when scoring; a vLLM server
allows as many as its ``--max-logprobs``, 20 by default, so pass ``max_logprobs=`` if the server was
started with more). Without them, scoring falls back to the top ``top_k`` log-probabilities and
candidates outside them are ``-inf``.

Log-probabilities are those the server reports: for vLLM, ``raw_logprobs`` by default, i.e. the
model's distribution at temperature 1 like the other engines. The API key is read from the
environment variable ``api_key_env`` at each request and never stored on the engine; a local
server needs none.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cai.engines.base import NEG_INF, Completion, Engine, EngineInfo, SamplingParams

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_TOKEN_ID_PREFIX = "token_id:"


class EngineRequestError(RuntimeError):
    """The server refused a request (a 4xx other than 429), or kept failing after retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class OpenAIEngine(Engine):
    """Completions over HTTP against an OpenAI-compatible server."""

    name = "openai"

    def __init__(self, model: str, *, base_url: str | list[str], api_key_env: str = "OPENAI_API_KEY",
                 tokenizer: Any = None, timeout: float = 120, max_concurrency: int = 64, retries: int = 3,
                 served_model: str | None = None,
                 prompts_per_request: int = 16, max_logprobs: int = 20, vllm_extensions: bool = True,
                 progress: bool = True):
        import httpx

        if max_concurrency < 1 or prompts_per_request < 1 or retries < 0:
            raise ValueError("max_concurrency and prompts_per_request must be >= 1, retries >= 0")
        super().__init__(model, _load_tokenizer(tokenizer if tokenizer is not None else model))
        # Several servers (a list, or URLs separated by commas): each request goes to the server
        # picked by a hash of its prompt's first tokens, so prompts that share a prefix (a judge's
        # template, a conversation's turns) meet the same server's prefix cache.
        urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        self.base_urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not self.base_urls:
            raise ValueError("base_url: give at least one server URL")
        self.base_url = self.base_urls[0]
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.prompts_per_request = prompts_per_request
        self.max_logprobs = max_logprobs
        self.vllm_extensions = vllm_extensions
        self.progress = progress
        self._served_model = served_model
        self._exact_scoring = vllm_extensions
        self._lock = threading.Lock()
        # max_concurrency requests in flight in all; a vLLM server keeps a GPU busy with ~64.
        self._client = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=max_concurrency,
                                                                         max_keepalive_connections=max_concurrency))

    # ---- HTTP ----------------------------------------------------------------------------------
    def _url(self, path: str, body: dict[str, Any] | None = None) -> str:
        base = self.base_urls[self.route(body)] if body else self.base_url
        root = base if base.endswith("/v1") else base + "/v1"
        return root + path

    ROUTE_PREFIX_TOKENS = 64

    def route(self, body: dict[str, Any] | None) -> int:
        """Index of the server for a request: a hash of its first prompt's first 64 tokens."""
        if len(self.base_urls) == 1 or not body or not body.get("prompt"):
            return 0
        first = body["prompt"][0] if isinstance(body["prompt"][0], list) else body["prompt"]
        key = ",".join(map(str, first[:self.ROUTE_PREFIX_TOKENS])).encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % len(self.base_urls)

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        url = self._url(path, body)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self._client.request(method, url, json=body, headers=self._headers())
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                if last:
                    raise EngineRequestError(f"{method} {url} failed after {attempt + 1} tries: {e!r}") from e
                self._sleep(attempt, None)
                continue
            if r.status_code < 400:
                return r.json()
            if r.status_code in _RETRY_STATUS and not last:
                self._sleep(attempt, r.headers.get("retry-after"))
                continue
            raise EngineRequestError(f"{method} {url} answered {r.status_code}: {r.text[:500]}", r.status_code)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _sleep(attempt: int, retry_after: str | None) -> None:
        delay = 0.5 * 2 ** attempt * (1 + 0.25 * random.random())
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), 60.0))
        time.sleep(delay)

    def served_model(self) -> str:
        """The ``model`` field to send: ``served_model``, or ``model`` if the server knows it, or the
        server's only model (or the one served from ``model``'s resolved folder)."""
        with self._lock:
            if self._served_model is None:
                self._served_model = self._discover_model()
            return self._served_model

    def _discover_model(self) -> str:
        served = [m["id"] for m in self._request("GET", "/models").get("data", [])]
        if self.model in served:
            return self.model
        try:
            from cai.models import resolve

            path = resolve(self.model)
        except Exception:
            path = None
        if path in served:
            return path
        if len(served) == 1:
            return served[0]
        raise EngineRequestError(f"the server at {self.base_url} does not serve {self.model!r}; it serves "
                                 f"{served}. Pass served_model=... to choose one.")

    def _parallel(self, jobs: list[Callable[[], Any]], desc: str) -> list[Any]:
        from tqdm.auto import tqdm

        disable = not self.progress or not sys.stderr.isatty() or len(jobs) <= 1
        with tqdm(total=len(jobs), desc=desc, unit="req", disable=disable, leave=False) as bar:
            if len(jobs) == 1:
                out = [jobs[0]()]
                bar.update(1)
                return out
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs))) as pool:
                futures = [pool.submit(job) for job in jobs]
                results = []
                for f in futures:
                    results.append(f.result())
                    bar.update(1)
                return results

    def info(self) -> EngineInfo:
        # Deliberately no API key (not even its presence) and no headers.
        return EngineInfo(self.name, self.model, {"base_url": self.base_url, "base_urls": self.base_urls,
                                                  "served_model": self._served_model,
                                                  "max_concurrency": self.max_concurrency})

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        for p, i in zip(prompts, ids, strict=True):
            if not i:
                raise ValueError(f"prompt encodes to no tokens: {p!r}")
        return ids

    def _body(self, prompt: list[list[int]], **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.served_model(), "prompt": prompt, **fields}
        if self.vllm_extensions:
            body.update(return_token_ids=True, return_tokens_as_token_ids=True, skip_special_tokens=True)
        return body

    # ---- generation --------------------------------------------------------------------------
    def _generate_prompts(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        ids = self._encode(prompts)
        common: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                                  "top_p": params.top_p, "logprobs": 0, "n": 1}
        if params.stop:
            common["stop"] = list(params.stop)
        # (prompt index, sample index) of each request's prompts, in order.
        plan: list[list[tuple[int, int]]] = []
        bodies: list[dict[str, Any]] = []
        if params.greedy:
            for start in range(0, len(ids), self.prompts_per_request):
                chunk = list(range(start, min(start + self.prompts_per_request, len(ids))))
                plan.append([(i, 0) for i in chunk])
                bodies.append(self._body([ids[i] for i in chunk], **common))
        else:
            for i in range(len(ids)):
                for j in range(params.n):
                    plan.append([(i, j)])
                    bodies.append(self._body([ids[i]], seed=params.sample_seed(i, j), **common))
        responses = self._parallel([lambda b=b: self._request("POST", "/completions", b) for b in bodies],
                                   f"{self.name} generate")
        out: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        for slots, resp in zip(plan, responses, strict=True):
            choices = sorted(resp["choices"], key=lambda c: c["index"])
            if len(choices) != len(slots):
                raise EngineRequestError(f"expected {len(slots)} choices, got {len(choices)}")
            for (i, j), choice in zip(slots, choices, strict=True):
                out[i][j] = self._completion(choice)
        return out  # type: ignore[return-value]

    def _completion(self, choice: dict[str, Any]) -> Completion:
        lp = choice.get("logprobs") or {}
        tokens = lp.get("tokens") or []
        token_logprobs = [NEG_INF if v is None or v <= -9999.0 else float(v)
                          for v in (lp.get("token_logprobs") or [])]
        token_ids = choice.get("token_ids")
        if token_ids is None:
            if tokens and all(t.startswith(_TOKEN_ID_PREFIX) for t in tokens):
                token_ids = [int(t[len(_TOKEN_ID_PREFIX):]) for t in tokens]
            else:  # a server without vLLM's extensions: token strings → ids, best effort
                token_ids = self.tokenizer.convert_tokens_to_ids(tokens)
        token_ids = [int(t) for t in token_ids]
        if len(token_logprobs) != len(token_ids):
            raise EngineRequestError(f"server returned {len(token_logprobs)} logprobs for {len(token_ids)} tokens")
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(text=choice.get("text") or "", token_ids=token_ids, logprobs=token_logprobs,
                          finish_reason=finish)

    # ---- scoring -----------------------------------------------------------------------------
    def _next_token_logprobs(self, prompts: list[str], candidates: list[int],
                             top_k: int) -> list[dict[int, float]]:
        ids = self._encode(prompts)
        unique = list(dict.fromkeys(candidates))
        chunks = [list(range(s, min(s + self.prompts_per_request, len(ids))))
                  for s in range(0, len(ids), self.prompts_per_request)]

        def score(chunk: list[int]) -> list[dict[int, float]]:
            exact = self._exact_scoring and len(unique) <= self.max_logprobs
            fields: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0}
            if exact:
                fields.update(logprobs=len(unique), logprob_token_ids=unique)
            else:
                fields["logprobs"] = min(top_k, self.max_logprobs)
            try:
                resp = self._request("POST", "/completions", self._body([ids[i] for i in chunk], **fields))
            except EngineRequestError as e:
                if not (exact and e.status == 400):
                    raise
                self._exact_scoring = False  # the server does not know logprob_token_ids: use top-k
                return score(chunk)
            choices = sorted(resp["choices"], key=lambda c: c["index"])
            return [self._candidate_logprobs(c, candidates) for c in choices]

        results = self._parallel([lambda c=c: score(c) for c in chunks], f"{self.name} score")
        return [d for chunk_result in results for d in chunk_result]

    def _continuation_logprobs(self, ids: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Prompt log-probs through ``/completions`` with ``echo`` and ``logprobs`` (vLLM's server
        and others that implement echo); a server without them gets a clear error."""
        chunks = [list(range(s, min(s + self.prompts_per_request, len(ids))))
                  for s in range(0, len(ids), self.prompts_per_request)]

        def score(chunk: list[int]) -> list[list[float]]:
            resp = self._request("POST", "/completions", self._body(
                [ids[i] for i in chunk], max_tokens=1, temperature=0.0, echo=True, logprobs=0))
            out = []
            for i, c in zip(chunk, sorted(resp["choices"], key=lambda c: c["index"]), strict=True):
                lps = (c.get("logprobs") or {}).get("token_logprobs") or []
                if len(lps) < len(ids[i]) or any(x is None for x in lps[starts[i]:len(ids[i])]):
                    raise EngineRequestError(
                        f"the server at {self.base_url} did not return prompt log-probs (echo + logprobs on "
                        "/completions); this judge method needs them: use a vLLM server or the "
                        "transformers/vllm engine")
                out.append([float(x) for x in lps[starts[i]:len(ids[i])]])
            return out

        results = self._parallel([lambda c=c: score(c) for c in chunks], f"{self.name} prompt logprobs")
        return [r for chunk_result in results for r in chunk_result]

    def _candidate_logprobs(self, choice: dict[str, Any], candidates: list[int]) -> dict[int, float]:
        top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
        by_id: dict[int, float] = {}
        for key, value in top.items():
            if key.startswith(_TOKEN_ID_PREFIX):
                tid = int(key[len(_TOKEN_ID_PREFIX):])
            else:  # decoded token text (servers without return_tokens_as_token_ids)
                matches = [c for c in candidates if self.tokenizer.decode([c]) == key]
                if not matches:
                    continue
                tid = matches[0]
            by_id[tid] = NEG_INF if value is None or value <= -9999.0 else float(value)
        return {c: by_id.get(c, NEG_INF) for c in candidates}

    def close(self) -> None:
        self._client.close()


def _load_tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from transformers import AutoTokenizer

    from cai.models import resolve

    return AutoTokenizer.from_pretrained(resolve(tokenizer))
