"""Tiny randomly initialised models on the real SmolLM2 tokenizer, built locally in seconds.

Used by the unit tests and benchmarks: same tokenizer and chat template as the embedded model,
so every code path (templating, option-token discovery, padding) is exercised for real, but
forward passes take milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cai.models import DEFAULT_MODEL, resolve

Kind = Literal["policy", "reward"]


def tiny_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                num_labels: int = 1, max_positions: int = 2048):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
    )


def build_tiny_model(out_dir: str | Path, kind: Kind = "policy", *, seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny model (and the SmolLM2 tokenizer) to ``out_dir``; returns the folder.

    ``policy``: a causal LM. ``reward``: a sequence classifier with one output (reward/value head).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_MODEL))
    config = tiny_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config) if kind == "policy" else LlamaForSequenceClassification(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
