import json
import os
import shutil
from pathlib import Path

import pytest

from cai import models


def test_pull_reuses_the_materialised_folder(smol_path):
    # Reuse is shown by the folder's files not being rewritten (no timing assert: speed lives in bench/).
    before = {f.name: f.stat().st_mtime_ns for f in Path(smol_path).iterdir() if f.is_file()}
    path = models.pull(models.DEFAULT_MODEL)
    assert str(path) == smol_path
    assert {f.name: f.stat().st_mtime_ns for f in Path(smol_path).iterdir() if f.is_file()} == before
    for f in ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"]:
        assert (path / f).exists(), f


def test_materialised_checkpoint_is_plain_and_chats(smol_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((models.builtin_path(models.DEFAULT_MODEL) / "config.json").read_text())
    assert "quantization_config" not in config  # an ordinary checkpoint that vLLM and peft accept
    tok = AutoTokenizer.from_pretrained(smol_path)
    model = AutoModelForCausalLM.from_pretrained(smol_path)
    x = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**x, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][x["input_ids"].shape[1]:])


def test_resolve_names_paths_and_errors(tmp_path, monkeypatch, tiny_policy_dir):
    assert models.resolve(str(tiny_policy_dir)) == str(tiny_policy_dir.resolve())
    # a hub id is passed through where the hub answers, and is one clear error offline when not cached
    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    assert models.resolve("org/name") == "org/name"
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    with pytest.raises(models.ModelNotFoundError, match="not in the local Hugging Face cache.*cai models pull"):
        models.resolve("org/name")
    with pytest.raises(models.ModelNotFoundError, match="not a Hugging Face model folder"):
        models.resolve(str(tmp_path))
    with pytest.raises(models.ModelNotFoundError, match="cai models list"):
        models.resolve("no-such-model")
    monkeypatch.setenv("CAI_MODELS_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(models.ModelNotFoundError, match="cai models pull smollm2-135m-instruct"):
        models.resolve(models.DEFAULT_MODEL)
    assert "not pulled" in models.list_models()[0]["status"]


def _copy_plain(src: Path, dst: Path) -> Path:
    """A copy with fresh mtimes and no digest sidecar, as `cp -r` makes it."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != models.DIGEST_FILE:
            shutil.copyfile(f, dst / f.name)
    return dst


def test_local_model_id_comes_from_content_not_path(tmp_path, tiny_policy_dir, demo_prompt_files):
    from safetensors.torch import load_file, save_file

    from cai.generate import GenerateConfig, run_generate
    from cai.ingest import ingest_file
    from cai.store import Store

    model_id = models.local_model_id(tiny_policy_dir)
    assert model_id.startswith("local:policy@") and len(model_id.split("@")[1]) == 12
    kept = shutil.copytree(tiny_policy_dir, tmp_path / "a" / "policy")  # mtimes and sidecar kept
    plain = _copy_plain(Path(tiny_policy_dir), tmp_path / "b" / "policy")  # rehashed from scratch
    assert models.local_model_id(kept) == models.local_model_id(plain) == model_id

    # Rows made from one copy are the rows of the other: a second run writes nothing.
    store = Store(tmp_path / "cai.duckdb")
    store.init()
    ingest_file(store, demo_prompt_files[0])
    gen = lambda folder: run_generate(  # noqa: E731
        store, GenerateConfig(model=str(folder), max_tokens=4, limit=2, batch_size=2), progress=False)
    first = gen(kept)
    assert first["generated"] == 2 and first["model_id"] == model_id
    again = gen(plain)
    assert again["generated"] == 0 and again["model_id"] == model_id
    assert store.scalar("SELECT count(*) FROM generations") == 2
    assert models.resolve_in_store(store, model_id) == (model_id, str(kept.resolve()))

    # Retrained weights in the same folder: a new id, new rows; the old id no longer names that folder.
    weights = kept / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    new_id = models.local_model_id(kept)
    assert new_id != model_id and new_id.startswith("local:policy@")
    with pytest.raises(models.ModelNotFoundError, match="have changed since.*pass the folder path"):
        models.resolve_in_store(store, model_id)
    retrained = gen(kept)
    assert retrained["generated"] == 2 and retrained["model_id"] == new_id
    assert store.scalar("SELECT count(DISTINCT model_id) FROM generations") == 2


def test_folder_digest_is_cached_by_size_and_mtime(tmp_path, tiny_policy_dir):
    folder = _copy_plain(Path(tiny_policy_dir), tmp_path / "policy")
    n_files = len(models.identity_files(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in models.identity_files(folder)}
    before = dict(models.hash_stats)
    first = models.local_model_id(folder)
    assert models.hash_stats["files_hashed"] - before["files_hashed"] == n_files
    sidecar = json.loads((folder / models.DIGEST_FILE).read_text())
    assert set(sidecar["files"]) == {f.name for f in models.identity_files(folder)}

    # Unchanged folder: no file is read again.
    assert models.local_model_id(folder) == first
    assert models.hash_stats["files_hashed"] - before["files_hashed"] == n_files
    # A touched file (new mtime, same bytes) is read again, alone, and the id stays.
    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert models.local_model_id(folder) == first
    assert models.hash_stats["files_hashed"] - before["files_hashed"] == n_files + 1
    # Files that do not change what the model computes are not part of its id.
    (folder / "README.md").write_text("notes")
    (folder / "training_args.bin").write_bytes(b"x")
    assert models.local_model_id(folder) == first


def test_resolve_in_store_ids(tmp_path, store, tiny_policy_dir):
    folder = str(Path(tiny_policy_dir).resolve())
    content_id = models.local_model_id(folder)
    assert models.resolve_in_store(store, models.DEFAULT_MODEL)[0] == models.DEFAULT_MODEL
    assert models.resolve_in_store(store, str(models.builtin_path(models.DEFAULT_MODEL)))[0] == models.DEFAULT_MODEL
    assert models.resolve_in_store(store, folder) == (content_id, folder)
    # A folder an older cai registered under its path gets its content id now.
    store.register_model(folder, "base", folder)
    assert models.resolve_in_store(store, folder) == (content_id, folder)
    # A folder cai trained (registered under its own id) keeps that id when named by path.
    trained = shutil.copytree(tiny_policy_dir, tmp_path / "models" / "sft-abc")
    store.register_model("sft-abc", "policy", str(trained))
    assert models.resolve_in_store(store, str(trained)) == ("sft-abc", str(trained.resolve()))
    # A local id this store never registered: one clear line.
    with pytest.raises(models.ModelNotFoundError, match="pass the folder path"):
        models.resolve_in_store(store, "local:policy@0123456789ab")
