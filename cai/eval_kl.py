"""KL of a policy to its baseline for the evaluation stage: teacher-forced log-probabilities of given responses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from cai.eval_judging import _mean, _stderr
from cai.store import Store

if TYPE_CHECKING:
    from cai.evaluate import EvaluateConfig


def response_logprob_sums(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                          response_ids: Sequence[Sequence[int]], *, batch_size: int = 16,
                          progress: bool = False, desc: str = "log-probs") -> list[float]:
    """Sum over response tokens of log p(token | prompt, earlier tokens) at temperature 1, per row.

    Rows are batched by length (left-padded prompt, right-padded response: the layout of PPO and
    DPO, whose forward pass this reuses), so padding stays small; results are in input order.
    """
    import torch

    from cai.dpo import PairEncoder, sequence_logprobs

    device = next(model.parameters()).device
    enc = PairEncoder(tokenizer, max_prompt_tokens=1 << 30, max_response_tokens=1 << 30)
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(response_ids[i])))
    out = [0.0] * len(order)
    bar = tqdm(total=len(order), desc=desc, unit="seq", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = [i for i in order[start:start + batch_size] if response_ids[i]]
            if chunk:
                batch = enc.batch([(list(prompt_ids[i]), list(response_ids[i])) for i in chunk], device)
                for i, v in zip(chunk, sequence_logprobs(model, batch).tolist(), strict=True):
                    out[i] = v
            bar.update(len(order[start:start + batch_size]))
    bar.close()
    return out


def prompt_token_ids(tokenizer: Any, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
    """The token ids an engine sends for each conversation (chat template + generation prompt)."""
    texts = [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
             for c in conversations]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []


def _pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _kl(store: Store, cfg: EvaluateConfig, prompts: list[dict[str, Any]], samples: dict[str, list[dict]],
        policy_path: str, baseline_path: str, *, progress: bool) -> dict[str, Any]:
    """KL(policy || baseline) per response, estimated on the policy's temperature-1 samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_path)
    base_tok = AutoTokenizer.from_pretrained(baseline_path)
    if tok.get_vocab() != base_tok.get_vocab():
        return {"skipped": "the policy and the baseline use different tokenizers"}
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    by_id = {p["prompt_id"]: p for p in prompts}
    rows = [r for pid in by_id for r in samples[pid]]
    prompt_ids = prompt_token_ids(tok, [by_id[r["prompt_id"]]["messages"] for r in rows])
    responses = [list(r["token_ids"] or []) for r in rows]
    device = _pick_device(cfg.device)

    def sums(path: str, desc: str) -> list[float]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        try:
            return response_logprob_sums(model, tok, prompt_ids, responses, batch_size=cfg.forward_batch_size,
                                         progress=progress, desc=desc)
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    base_lp = sums(baseline_path, "KL: baseline log-probs")
    stored_ok = all(r["logprobs"] is not None and len(r["logprobs"]) == len(r["token_ids"] or []) for r in rows)
    # The engine stored the policy's raw (temperature-1) log-probs with each sample; recompute only
    # if an engine left them out.
    pol_lp = [float(sum(r["logprobs"])) for r in rows] if stored_ok else sums(policy_path, "KL: policy log-probs")
    kls = [a - b for a, b in zip(pol_lp, base_lp, strict=True)]
    tokens = sum(len(x) for x in responses)
    return {"kl": _mean(kls), "stderr": _stderr(kls), "n": len(kls), "tokens": tokens,
            "kl_per_token": sum(kls) / tokens if tokens else None,
            "policy_logprobs": "stored" if stored_ok else "recomputed", "values": kls}
