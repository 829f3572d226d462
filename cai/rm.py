"""Using a trained reward model: load it, score (prompt, response) rows, evaluate it on human pairs.

A cai reward model is a plain Hugging Face checkpoint folder (``AutoModelForSequenceClassification``
with one output loads it) plus ``cai_reward.json``::

    {"format": "cai-reward/1", "offset": -0.73, "base_model": "smollm2-135m-instruct",
     "chat_template": true, "max_length": 1024, "truncation": "left", "pooling": "last_token", ...}

How a reward is read (the trainer, ``RewardModel.score`` and the PPO reward all agree on this):

1. the conversation ``prompt messages + [{"role": "assistant", "content": response}]`` goes through
   the tokenizer's chat template (``chat_template: false``: a plain ``role: text`` rendering);
2. sequences longer than ``max_length`` tokens lose tokens on the left, so the end of the response,
   where the reward is read, is always seen;
3. the backbone runs once; the scalar head is applied to the hidden state of the last real token
   (found from the attention mask, so padding side and pad id never matter);
4. ``offset`` (the mean raw reward on the trainer's validation responses) is subtracted, so rewards
   are centred at 0. The raw ``AutoModelForSequenceClassification`` logits are *not* centred.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.store import Store, content_hash, now

if TYPE_CHECKING:
    import torch

Message = dict[str, str]
Conversation = list[Message]
PromptLike = str | Sequence[Message]

META_FILE = "cai_reward.json"
META_FORMAT = "cai-reward/1"


# ---- encoding (shared with the trainer) ------------------------------------------------------
def as_messages(prompt: PromptLike) -> list[Message]:
    """A prompt as a chat list: text becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def render(tokenizer, messages: Sequence[Message], response: str, use_chat_template: bool = True) -> str:
    """The text a reward is read from: the conversation with the response as the assistant's turn."""
    conversation = [*as_messages(messages), {"role": "assistant", "content": response}]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    eos = tokenizer.eos_token or ""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation) + eos


def encode(tokenizer, prompts: Sequence[PromptLike], responses: Sequence[str], *, max_length: int,
           use_chat_template: bool = True) -> tuple[list[list[int]], int]:
    """Token ids of every (prompt, response), left-truncated to ``max_length``; and how many were cut.

    The rendered text already holds the template's special tokens, so none are added again.
    """
    texts = [render(tokenizer, p, r, use_chat_template) for p, r in zip(prompts, responses, strict=True)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    truncated = sum(len(x) > max_length for x in ids)
    return [x[-max_length:] for x in ids], truncated


def collate(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a list of token-id lists."""
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    return input_ids, attention_mask


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One raw reward per right-padded sequence: the scalar head on the last real token's hidden state.

    ``model`` is a ``*ForSequenceClassification`` (or a PEFT wrapper of one). Reading the head at one
    position instead of letting the HF class pool by pad id gives the same number whenever the last
    token is not the pad token, and a well-defined one when it is (SmolLM2 pads with ``<|im_end|>``).
    """
    import torch

    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected in place, use the inner model
        model = model.get_base_model()
    backbone = getattr(model, model.base_model_prefix)
    head = model.score if hasattr(model, "score") else model.classifier
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(last_hidden).squeeze(-1).float()


def load_sequence_classifier(path: str, dtype=None):
    """``AutoModelForSequenceClassification`` with one output; a causal-LM folder gets a new head
    (initialised from torch's RNG, so seed first) and no warning about it."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialized" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                   dtype=dtype or torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---- the wrapper ----------------------------------------------------------------------------------
class RewardModel:
    """A trained reward model, ready to score: ``RewardModel.load(id_or_folder).score(prompts, responses)``.

    Usable as a frozen reward (``score``) and as a starting point for a PPO critic (``.model`` is the
    ``*ForSequenceClassification``, ``.tokenizer`` its tokenizer).
    """

    def __init__(self, model, tokenizer, *, offset: float = 0.0, max_length: int = 1024,
                 use_chat_template: bool = True, model_id: str | None = None, path: str | None = None,
                 meta: dict[str, Any] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.offset, self.max_length, self.use_chat_template = float(offset), max_length, use_chat_template
        self.model_id, self.path, self.meta = model_id, path, meta or {}

    @classmethod
    def load(cls, name: str | Path, *, store: Store | None = None, device: str | None = None,
             dtype=None) -> RewardModel:
        """From a folder, or a model id registered in ``store`` (default: ``$CAI_DB``)."""
        from cai.models import local_model_id, resolve_in_store

        name = str(name)
        folder = Path(name).expanduser()
        if (folder / "config.json").exists():
            # a cai-trained folder names itself in its meta file; any other folder gets its content id
            path = str(folder.resolve())
            model_id = name if (folder / META_FILE).exists() else local_model_id(folder)
        else:
            model_id, path = resolve_in_store(store or Store(), name)
        meta_file = Path(path) / META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        model = load_sequence_classifier(path, dtype=dtype)
        model.eval().requires_grad_(False)
        if device:
            model.to(device)
        return cls(model, load_tokenizer(path), offset=meta.get("offset", 0.0),
                   max_length=meta.get("max_length", 1024), use_chat_template=meta.get("chat_template", True),
                   model_id=meta.get("model_id", model_id), path=path, meta=meta)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def score(self, prompts: Sequence[PromptLike], responses: Sequence[str], *, batch_size: int = 16,
              raw: bool = False) -> list[float]:
        """One reward per (prompt, response), centred by the stored offset unless ``raw``.

        Sequences are batched by length (longest first), so padding stays small; the result is in the
        input order and does not depend on ``batch_size``.
        """
        import torch

        ids, _ = encode(self.tokenizer, prompts, responses, max_length=self.max_length,
                        use_chat_template=self.use_chat_template)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = [0.0] * len(ids)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                input_ids, mask = collate([ids[i] for i in chunk], self.tokenizer.pad_token_id)
                rewards = sequence_rewards(self.model, input_ids.to(self.device), mask.to(self.device))
                for i, r in zip(chunk, rewards.tolist(), strict=True):
                    out[i] = r if raw else r - self.offset
        self.model.train(was_training)
        return out

    __call__ = score  # the PPO ``Reward`` protocol: reward(prompts, responses) -> list[float]


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (Path(folder) / META_FILE).write_text(json.dumps({"format": META_FORMAT, **meta}, indent=2, default=str))


# ---- files of pairs and rows -------------------------------------------------------------------
class PairsFileError(ValueError):
    pass


@dataclass
class HumanPair:
    id: str
    messages: list[Message]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)


def _messages_of(rec: dict[str, Any], where: str) -> list[Message]:
    prompt = rec.get("messages", rec.get("prompt"))
    if isinstance(prompt, str) and prompt.strip():
        return as_messages(prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in prompt):
        return as_messages(prompt)
    raise PairsFileError(f"{where}: needs 'prompt' (text or a chat list of {{role, content}}) or 'messages'")


def _read_jsonl(path: Path, limit: int | None) -> list[tuple[int, dict[str, Any]]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairsFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise PairsFileError(f"{path}:{lineno}: expected a JSON object")
            out.append((lineno, rec))
            if limit and len(out) >= limit:
                break
    return out


def _response_text(value: Any) -> str | None:
    """A response as text: a string, or a one-message chat list (TRL's conversational format)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        content = value[0].get("content")
        return content if isinstance(content, str) else None
    return None


def read_pairs(path: str | Path, limit: int | None = None) -> list[HumanPair]:
    """Human-labelled pairs, one JSON object a line: ``prompt`` (text or chat list), ``chosen``,
    ``rejected``, optional ``id`` and anything else (kept in ``meta``): the PandaLM / TRL format."""
    path = Path(path)
    pairs = []
    for lineno, rec in _read_jsonl(path, limit):
        where = f"{path}:{lineno}"
        chosen, rejected = _response_text(rec.get("chosen")), _response_text(rec.get("rejected"))
        if chosen is None or rejected is None:
            raise PairsFileError(f"{where}: needs 'chosen' and 'rejected' responses (text)")
        meta = {k: v for k, v in rec.items() if k not in {"id", "prompt", "messages", "chosen", "rejected"}}
        pairs.append(HumanPair(str(rec.get("id", lineno)), _messages_of(rec, where), chosen, rejected, meta))
    if not pairs:
        raise PairsFileError(f"{path}: no pairs")
    return pairs


def read_score_rows(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows to score: ``prompt`` (or ``messages``) and ``response``; or pairs (``chosen``/``rejected``),
    whose two responses are both scored. Every other field is passed through."""
    path = Path(path)
    rows = []
    for lineno, rec in _read_jsonl(path, limit):
        where = f"{path}:{lineno}"
        messages = _messages_of(rec, where)
        responses = {k: _response_text(rec.get(k)) for k in ("response", "chosen", "rejected") if k in rec}
        if not responses or any(v is None for v in responses.values()):
            raise PairsFileError(f"{where}: needs 'response' (or 'chosen' and 'rejected') as text")
        rows.append({"id": rec.get("id", lineno), "messages": messages, "responses": responses, "record": rec})
    return rows


# ---- cai rm score ----------------------------------------------------------------------------------
DEFAULT_SCORE_SQL = ("SELECT g.generation_id AS id, p.messages, g.text AS response FROM generations g "
                     "JOIN prompts p USING (prompt_id) WHERE g.text IS NOT NULL ORDER BY g.created_at, g.generation_id")


def _score_key(messages: Any, responses: Any) -> str:
    """A row's shard key: the content it scores (position-free, so ``--shard`` partitions exactly)."""
    return content_hash("rm-score", messages, responses)


def score_file(rm: RewardModel, path: str | Path, *, limit: int | None = None,
               batch_size: int = 16, shard: str | None = None) -> list[dict[str, Any]]:
    """The file's records with ``reward`` (or ``reward_chosen`` and ``reward_rejected``) added.
    ``shard``: ``"I/N"``, only the records (of the first ``limit``) whose content hashes to shard I."""
    from cai.sharding import take_shard

    rows = take_shard(read_score_rows(path, limit), shard, lambda r: _score_key(r["messages"], r["responses"]))
    prompts, responses, where = [], [], []
    for i, row in enumerate(rows):
        for key, text in row["responses"].items():
            prompts.append(row["messages"])
            responses.append(text)
            where.append((i, "reward" if key == "response" else f"reward_{key}"))
    rewards = rm.score(prompts, responses, batch_size=batch_size)
    out = [dict(row["record"]) for row in rows]
    for (i, key), r in zip(where, rewards, strict=True):
        out[i][key] = r
    return out


def score_store(rm: RewardModel, store: Store, *, sql: str | None = None, limit: int | None = None,
                batch_size: int = 16, shard: str | None = None) -> list[dict[str, Any]]:
    """Score rows of a read-only query returning ``messages`` (or ``prompt``) and ``response``
    (default: every generation). ``shard``: only the rows (of the first ``limit``) whose prompt and
    response hash to shard I of N."""
    from cai.sharding import take_shard

    query = sql or DEFAULT_SCORE_SQL
    if limit:
        query = f"SELECT * FROM ({query}) LIMIT {int(limit)}"
    rows = store.query(query)
    if rows and ("response" not in rows[0] or not ({"messages", "prompt"} & set(rows[0]))):
        raise ValueError("the query must return a 'response' column and a 'messages' (or 'prompt') column")
    rows = take_shard(rows, shard, lambda r: _score_key(r.get("messages", r.get("prompt")), r["response"]))
    prompts = []
    for r in rows:
        if "messages" in r:  # the store keeps chat lists as JSON text
            prompts.append(as_messages(json.loads(r["messages"]) if isinstance(r["messages"], str) else r["messages"]))
        else:
            prompts.append(as_messages(r["prompt"]))
    rewards = rm.score(prompts, [r["response"] or "" for r in rows], batch_size=batch_size)
    return [{**{k: v for k, v in r.items() if k != "messages"}, "reward": x} for r, x in zip(rows, rewards, strict=True)]


# ---- cai rm eval -----------------------------------------------------------------------------------
def evaluate_human_pairs(store: Store, model: str, path: str | Path, *, limit: int | None = None,
                         batch_size: int = 16, rm: RewardModel | None = None,
                         by: list[str] | None = None) -> dict[str, Any]:
    """Accuracy of a reward model on human-labelled pairs: how often r(chosen) > r(rejected).

    Exact ties count as half right. Accuracy comes with its Wilson 95 % interval, beside the "pick
    the longer response" baseline on the same pairs and per subset (``by``: fields of the file;
    default the subset-like ones it has, see ``cai.pair_accuracy``). Results go to ``evaluations``
    (kind ``reward_model``, one row per metric, subject = the model id, dataset = the file's name,
    ``details`` with ``low``/``high``/``interval_n``); returns them as a summary (``report``: the
    same as lines of text).
    """
    from cai.pair_accuracy import accuracy_report, evaluation_metrics

    started = time.time()
    path = Path(path)
    pairs = read_pairs(path, limit)
    rm = rm or RewardModel.load(model, store=store)
    model_id = rm.model_id or model
    run_id = store.start_run("rm_eval", {"model": model_id, "file": str(path), "limit": limit})
    try:
        n = len(pairs)
        rewards = rm.score([p.messages for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                           batch_size=batch_size)
        margins = [c - r for c, r in zip(rewards[:n], rewards[n:], strict=True)]
        right = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
        accuracy = sum(right) / n
        by_agreement: dict[str, list[float]] = {}
        for p, ok in zip(pairs, right, strict=True):
            by_agreement.setdefault(str(p.meta.get("agreement", "all")), []).append(ok)
        acc = accuracy_report(right, [p.chosen for p in pairs], [p.rejected for p in pairs], [p.meta for p in pairs], by)
        summary: dict[str, Any] = {
            "model_id": model_id, "dataset": path.name, "pairs": n, "accuracy": round(accuracy, 4),
            "accuracy_95ci": [round(acc.accuracy.low, 4), round(acc.accuracy.high, 4)],
            "length_baseline": round(acc.length_baseline.estimate, 4),
            "length_baseline_95ci": [round(acc.length_baseline.low, 4), round(acc.length_baseline.high, 4)],
            "accuracy_minus_length_baseline": round(acc.vs_length.estimate, 4),
            "accuracy_minus_length_baseline_95ci": ([round(acc.vs_length.low, 4), round(acc.vs_length.high, 4)]
                                                    if acc.vs_length.stderr is not None else None),
            "by_subset": [{"field": g.field, "value": g.value, "pairs": g.accuracy.n,
                           "accuracy": round(g.accuracy.estimate, 4),
                           "accuracy_95ci": [round(g.accuracy.low, 4), round(g.accuracy.high, 4)],
                           "length_baseline": round(g.length_baseline.estimate, 4)} for g in acc.groups],
            "report": acc.lines("accuracy"),
            "mean_margin": round(sum(margins) / n, 4),
            "accuracy_by_agreement": {k: {"pairs": len(v), "accuracy": round(sum(v) / len(v), 4)}
                                      for k, v in sorted(by_agreement.items())},
            "reward_mean": round(sum(rewards) / len(rewards), 4),
        }
        file_hash = content_hash(path.read_bytes().decode("utf-8", errors="replace"))
        details = {"file": str(path), "file_hash": file_hash, "limit": limit, "pairs": n, "n": n,
                   "accuracy_by_agreement": summary["accuracy_by_agreement"], "offset": rm.offset}
        metrics: dict[str, tuple[float, dict[str, Any]]] = {"mean_margin": (summary["mean_margin"], {})}
        for name, value, iv in evaluation_metrics(acc, "accuracy"):
            metrics[name] = (value, {k: v for k, v in iv.items() if k != "n"} | {"interval_n": iv["n"]})
        if "3/3" in by_agreement:
            metrics["accuracy_unanimous"] = (sum(by_agreement["3/3"]) / len(by_agreement["3/3"]), {})
        stamp = now()
        store.insert("evaluations", [{
            "evaluation_id": content_hash("reward_model", model_id, file_hash, limit, metric,
                                          *([by] if by else [])),
            "kind": "reward_model", "subject_id": model_id, "baseline_id": None, "dataset": path.name,
            "metric": metric, "value": float(value), "details": json.dumps(details | extra, default=str),
            "run_id": run_id, "created_at": stamp} for metric, (value, extra) in metrics.items()])
        summary["seconds"] = round(time.time() - started, 2)
    except BaseException as e:
        store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=repr(e))
        raise
    store.finish_run(run_id, "ok", summary)
    summary["run_id"] = run_id
    return summary
