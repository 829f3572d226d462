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
