"""Hugging Face transformers engine: the CPU default for small jobs, and the way to sample from a
live policy during training (``TransformersEngine.from_loaded``).

Generation is a hand-written decoding loop over a KV cache rather than ``model.generate`` so that
every row has its own seeded ``torch.Generator`` (sample ``j`` of request ``i`` is the same
whatever the batch size, sort order or ``n``), the log-probability of every sampled token comes
from the raw logits (temperature 1, before top-p), stop strings behave as in vLLM, and finished
rows leave the batch instead of being padded along.

Batching: prompts are sorted by length and cut into batches of at most ``batch_size`` sequences
(``batch_size // n`` prompts with ``n`` samples each); prompts are left-padded; each prompt is
prefilled once and its KV cache is repeated for its ``n`` samples.

Threads: ``num_threads`` (default: leave torch's setting alone) sets ``torch.set_num_threads`` for
the duration of each call. Decoding a small model is hundreds of tiny parallel regions per token,
so on a machine whose cores are busy with other work (a vLLM engine core, other jobs) fewer
threads than cores is much faster: on a loaded 2-core box, 1 thread ran 10x faster than 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cai.engines.base import Completion, Engine, EngineInfo, SamplingParams

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def _torch_dtype(dtype: Any) -> Any:
    """``None``/"auto" → "auto" (the checkpoint's dtype); a name or a torch dtype → torch dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    return getattr(torch, name)


@dataclass
class _Row:
    """One sequence being decoded: sample ``sample`` of prompt ``prompt``."""

    prompt: int
    sample: int
    generator: Any = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None  # set when a stop string ended the row
    finish_reason: str | None = None


class TransformersEngine(Engine):
    """Batched generation and exact next-token scoring with a transformers causal LM."""

    name = "transformers"

    def __init__(self, model: str, *, device: str | None = None, dtype: Any = None, batch_size: int = 16,
                 progress: bool = True, tokenizer: Any = None, num_threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cai.models import resolve

        path = resolve(model)
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
        if device is None:  # a GPU when there is one (CUDA_VISIBLE_DEVICES / Ray's GPU resource pick which)
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        lm.to(device)
        lm.eval()
        self._setup(lm, tok, model, batch_size=batch_size, progress=progress, num_threads=num_threads)
        self._path = path

    @classmethod
    def from_loaded(cls, model_obj: Any, tokenizer: Any, name: str, *, batch_size: int = 16,
                    progress: bool = False, num_threads: int | None = None) -> TransformersEngine:
        """Wrap a model that is already in memory (e.g. the live PPO policy); nothing is copied.

        The model is put in eval mode for each call and restored to its previous mode afterwards.
        """
        self = cls.__new__(cls)
        self._setup(model_obj, tokenizer, name, batch_size=batch_size, progress=progress, num_threads=num_threads)
        self._path = None
        return self

    def _setup(self, lm: Any, tokenizer: Any, name: str, *, batch_size: int, progress: bool,
               num_threads: int | None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if num_threads is not None and num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        self.num_threads = num_threads
        Engine.__init__(self, name, tokenizer)
        self.lm = lm
        self.batch_size = batch_size
        self.progress = progress
        self._logits_to_keep_ok = True
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad)

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def device(self) -> Any:
        import torch

        try:
            return next(self.lm.parameters()).device
        except StopIteration:  # pragma: no cover - a model without parameters
            return torch.device("cpu")

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(super().eos_token_ids)
        gen_cfg = getattr(self.lm, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
        return ids

    def info(self) -> EngineInfo:
        return EngineInfo(self.name, self.model, {"dtype": str(getattr(self.lm, "dtype", "")),
                                                  "device": str(self.device),
                                                  "batch_size": self.batch_size})

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        for p, i in zip(prompts, ids, strict=True):
            if not i:
                raise ValueError(f"prompt encodes to no tokens: {p!r}")
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _batches(self, ids: list[list[int]], per_batch: int) -> list[list[int]]:
        """Indices of prompts, sorted by length (longest first), cut into batches."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        return [order[k:k + per_batch] for k in range(0, len(order), per_batch)]

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        disable = not self.progress or not sys.stderr.isatty() or total <= 1
        return tqdm(total=total, desc=desc, unit="batch", disable=disable, leave=False)

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any) -> Any:
        """Logits of the last position, float32, shape (batch, vocab)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "past_key_values": cache, "use_cache": cache is not None}
        if self._logits_to_keep_ok:
            try:
                out = self.lm(**kwargs, logits_to_keep=1)
            except TypeError:  # a wrapped model that does not take logits_to_keep
                self._logits_to_keep_ok = False
                out = self.lm(**kwargs)
        else:
            out = self.lm(**kwargs)
        return out.logits[:, -1, :].float()

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Any, Any, Any]:
        import torch

        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        return input_ids.to(dev), mask.to(dev), positions.to(dev)

    class _Running:
        """Eval mode, no autograd, and ``num_threads`` torch threads, all restored afterwards."""

        def __init__(self, engine: TransformersEngine):
            import torch

            self.lm, self.num_threads, self.torch = engine.lm, engine.num_threads, torch
            self.inference = torch.inference_mode()

        def __enter__(self) -> None:
            self.was_training = bool(getattr(self.lm, "training", False))
            self.threads = self.torch.get_num_threads()
            if self.num_threads:
                self.torch.set_num_threads(self.num_threads)
            self.lm.eval()
            self.inference.__enter__()

        def __exit__(self, *exc: object) -> None:
            self.inference.__exit__(*exc)
            if self.was_training:
                self.lm.train()
            if self.num_threads:
                self.torch.set_num_threads(self.threads)

    # ---- generation --------------------------------------------------------------------------
    def _generate_prompts(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        ids = self._encode(prompts)
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        batches = self._batches(ids, max(1, self.batch_size // params.n))
        bar = self._bar(len(batches), f"{self.name} generate")
        try:
            with self._Running(self):
                for batch in batches:
                    for r, completion in self._decode_batch([ids[i] for i in batch], batch, params):
                        results[batch[r.prompt]][r.sample] = completion
                    bar.update(1)
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def _decode_batch(self, seqs: list[list[int]], request_indices: list[int],
                      params: SamplingParams) -> Iterator[tuple[_Row, Completion]]:
        """Decode ``params.n`` samples for each prompt of one batch; yields (row, completion)."""
        import torch

        n, dev = params.n, self.device
        eos = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=dev)
        input_ids, mask, positions = self._left_pad(seqs)
        cache = self._new_cache()
        logits = self._forward(input_ids, mask, positions, cache)
        positions = positions[:, -1:]
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            mask = mask.repeat_interleave(n, dim=0)
            positions = positions.repeat_interleave(n, dim=0)

        rows = []
        for p, req in enumerate(request_indices):
            for j in range(n):
                g = None
                if not params.greedy:
                    g = torch.Generator(device=dev)
                    g.manual_seed(params.sample_seed(req, j))
                rows.append(_Row(prompt=p, sample=j, generator=g))
        active = list(range(len(rows)))  # rows[active[k]] is batch row k
        max_stop = max((len(s) for s in params.stop), default=0)

        for step in range(params.max_tokens):
            logprobs = torch.log_softmax(logits, dim=-1)
            tokens = self._pick(logits, params, [rows[a].generator for a in active])
            chosen = logprobs.gather(1, tokens[:, None])[:, 0]
            is_eos = torch.isin(tokens, eos)
            keep: list[int] = []
            for k, (tok, lp, stop_tok) in enumerate(zip(tokens.tolist(), chosen.tolist(), is_eos.tolist(),
                                                        strict=True)):
                row = rows[active[k]]
                row.token_ids.append(tok)
                row.logprobs.append(lp)
                if stop_tok or (params.stop and self._hit_stop(row, params.stop, max_stop)):
                    row.finish_reason = "stop"
                elif step + 1 == params.max_tokens:
                    row.finish_reason = "length"
                else:
                    keep.append(k)
                if row.finish_reason:
                    yield row, self._completion(row)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.batch_select_indices(idx)
                mask, positions, tokens = mask[idx], positions[idx], tokens[idx]
                active = [active[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            positions = positions + 1
            logits = self._forward(tokens[:, None], mask, positions, cache)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        config = getattr(self.lm, "config", None)
        try:
            return DynamicCache(config=config)
        except Exception:  # pragma: no cover - unusual configs
            return DynamicCache()

    @staticmethod
    def _pick(logits: Any, params: SamplingParams, generators: list[Any]) -> Any:
        """Next token per row: argmax when greedy, else a draw from each row's own generator."""
        import torch

        if params.greedy:
            return logits.argmax(dim=-1)
        scaled = logits / params.temperature
        if params.top_p < 1.0:
            # Nucleus: drop the low-probability tail whose mass is <= 1 - top_p (keeps at least one).
            sorted_logits, sorted_idx = torch.sort(scaled, descending=False, dim=-1)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cum <= (1 - params.top_p)
            remove_sorted[:, -1] = False
            remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
            scaled = scaled.masked_fill(remove, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        for r, g in enumerate(generators):
            out[r] = torch.multinomial(probs[r], 1, generator=g)[0]
        return out

    def _hit_stop(self, row: _Row, stops: tuple[str, ...], max_stop: int) -> bool:
        """Has the newest token completed a stop string? Sets ``row.text`` to the cut text if so."""
        text = self._decode(row.token_ids)
        # Only text that could contain a stop string ending in the newest token needs searching;
        # a margin covers characters that change when a multi-byte sequence completes.
        prev = len(self._decode(row.token_ids[:-1])) if len(row.token_ids) > 1 else 0
        start = max(0, prev - max_stop - 4)
        hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
        if not hits:
            return False
        row.text = text[:min(hits)]
        return True

    def _completion(self, row: _Row) -> Completion:
        if row.text is not None:
            text = row.text
        else:
            ids = row.token_ids
            if row.finish_reason == "stop" and ids and ids[-1] in self.eos_token_ids:
                ids = ids[:-1]
            text = self._decode(ids)
        return Completion(text=text, token_ids=list(row.token_ids), logprobs=list(row.logprobs),
                          finish_reason=row.finish_reason or "length")

    # ---- scoring -----------------------------------------------------------------------------
    def _next_token_logprobs(self, prompts: list[str], candidates: list[int],
                             top_k: int) -> list[dict[int, float]]:
        """Exact log-probabilities (``top_k`` is ignored): one forward pass per batch."""
        import torch

        ids = self._encode(prompts)
        out: list[dict[int, float]] = [{} for _ in prompts]
        cand = torch.tensor(candidates, dtype=torch.long, device=self.device)
        batches = self._batches(ids, self.batch_size)
        bar = self._bar(len(batches), f"{self.name} score")
        try:
            with self._Running(self):
                for batch in batches:
                    input_ids, mask, positions = self._left_pad([ids[i] for i in batch])
                    logits = self._forward(input_ids, mask, positions, None)
                    values = torch.log_softmax(logits, dim=-1)[:, cand].tolist()
                    for i, row in zip(batch, values, strict=True):
                        out[i] = dict(zip(candidates, row, strict=True))
                    bar.update(1)
        finally:
            bar.close()
        return out

    def _continuation_logprobs(self, ids: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Exact token log-probabilities of ids[k][starts[k]:], one forward pass per batch."""
        import torch

        out: list[list[float]] = [[] for _ in ids]
        batches = self._batches(ids, self.batch_size)
        bar = self._bar(len(batches), f"{self.name} prompt logprobs")
        try:
            with self._Running(self):
                for batch in batches:
                    seqs = [ids[i] for i in batch]
                    input_ids, mask, positions = self._left_pad(seqs)
                    logits = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                     use_cache=False).logits.float()
                    logp = torch.log_softmax(logits[:, :-1], dim=-1)
                    token_lp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                    width = input_ids.shape[1]
                    for r, i in enumerate(batch):
                        pad = width - len(ids[i])
                        # token t (in the unpadded sequence) is predicted at position pad + t - 1
                        out[i] = token_lp[r, pad + starts[i] - 1:].tolist()
                    bar.update(1)
        finally:
            bar.close()
        return out

    def close(self) -> None:
        """Drop the reference to the model (memory is freed once nothing else holds it)."""
        self.lm = None
