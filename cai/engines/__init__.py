"""Engines: one interface (``Engine``), three implementations, chosen by name.

``make_engine("transformers" | "hf" | "vllm" | "openai", model, **options)`` builds one;
``get_engine`` does the same but keeps one engine per (kind, model, options) for the life of the
process, so every stage that asks for the same model reuses the already-loaded weights.

Implementations are imported lazily: importing ``cai.engines`` loads neither torch nor vLLM.
"""

from __future__ import annotations

import threading
from typing import Any

from cai.engines.base import (
    NEG_INF,
    Completion,
    Conversation,
    Engine,
    EngineInfo,
    Message,
    SamplingParams,
    item_seed,
    sample_seed,
)

__all__ = [
    "NEG_INF", "Completion", "Conversation", "Engine", "EngineInfo", "Message", "SamplingParams",
    "sample_seed", "item_seed", "ENGINE_KINDS", "make_engine", "get_engine", "clear_engines", "engine_class",
]

# kind → (module, class); aliases map to a canonical kind.
ENGINE_KINDS: dict[str, tuple[str, str]] = {
    "transformers": ("cai.engines.hf", "TransformersEngine"),
    "vllm": ("cai.engines.vllm_engine", "VLLMEngine"),
    "openai": ("cai.engines.openai_engine", "OpenAIEngine"),
}
_ALIASES = {"hf": "transformers", "huggingface": "transformers", "http": "openai"}


def canonical_kind(kind: str) -> str:
    k = kind.strip().lower()
    k = _ALIASES.get(k, k)
    if k not in ENGINE_KINDS:
        choices = ", ".join(sorted([*ENGINE_KINDS, *_ALIASES]))
        raise ValueError(f"unknown engine kind {kind!r}; choose one of: {choices}")
    return k


def engine_class(kind: str) -> type[Engine]:
    import importlib

    module, cls = ENGINE_KINDS[canonical_kind(kind)]
    return getattr(importlib.import_module(module), cls)


class EngineConfigError(ValueError):
    """An engine asked for with options it can't be built from (a missing --base-url, an unknown option)."""


def check_engine_options(kind: str, options: dict[str, Any]) -> None:
    """Raise EngineConfigError unless ``engine_class(kind)(model, **options)`` binds: every required
    option given, none unknown. Checked before a stage writes anything."""
    import inspect

    cls = engine_class(kind)
    try:
        inspect.signature(cls.__init__).bind(None, "model", **options)
    except TypeError as e:
        params = inspect.signature(cls.__init__).parameters
        missing = [n for n, p in params.items() if n not in ("self", "model") and p.default is p.empty
                   and p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL and n not in options]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise EngineConfigError(f"engine {canonical_kind(kind)!r} needs {flags} "
                                    f"(engine_options: {', '.join(missing)})") from None
        raise EngineConfigError(f"engine {canonical_kind(kind)!r}: bad engine_options {sorted(options)}: {e}") from None


def make_engine(kind: str, model: str, **options: Any) -> Engine:
    """A new engine of ``kind`` ("transformers"/"hf", "vllm", "openai") for ``model``."""
    check_engine_options(kind, options)
    return engine_class(kind)(model, **options)


_CACHE: dict[tuple[str, str, str], Engine] = {}
_LOCK = threading.Lock()


def _options_key(options: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in options.items()))


def get_engine(kind: str, model: str, **options: Any) -> Engine:
    """The process-wide engine for these arguments, created on first use and then reused."""
    key = (canonical_kind(kind), str(model), _options_key(options))
    with _LOCK:
        engine = _CACHE.get(key)
        if engine is None:
            engine = make_engine(key[0], model, **options)
            _CACHE[key] = engine
        return engine


def clear_engines() -> None:
    """Close and forget every cached engine (tests, or to free memory between stages)."""
    with _LOCK:
        engines = list(_CACHE.values())
        _CACHE.clear()
    for e in engines:
        e.close()
