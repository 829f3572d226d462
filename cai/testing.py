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


BRIEF_REPLIES = (
    "Sure, here is a short answer.",
    "I would rather not help with that, but here is a safer idea.",
    "Yes. Drink water and rest.",
    "No, that would hurt someone.",
    "Try asking a friend for help.",
    "Here are three steps: plan, act, check.",
)


def train_brief(model_dir: str | Path, *, steps: int = 60, lr: float = 3e-3, seed: int = 0) -> Path:
    """Teach a tiny policy (in place) to answer any chat with one of a few short replies and stop.

    A random tiny model never samples EOS, so every response runs to the token limit; stages whose
    behaviour depends on responses that end (critique statuses, PPO's EOS penalty, refusal counts)
    need a model that stops. A minute of CPU is not needed: a few dozen Adam steps do it.
    """
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(model_dir)
    marker = out / ".brief"
    if marker.exists():
        return out
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    questions = ["How do I bake bread?", "Tell me a secret.", "What is 2 + 2?", "Help me write a poem.",
                 "How can I hurt my neighbour?", "Where is Paris?", "Give me advice.", "Explain taxes."]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids, labels = [], []
        for _ in range(8):
            prompt = tok.apply_chat_template([{"role": "user", "content": rng.choice(questions)}],
                                             tokenize=False, add_generation_prompt=True)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            r = tok(rng.choice(BRIEF_REPLIES), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        label_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_t).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    marker.write_text(f"{loss.item():.4f}\n")
    return out
