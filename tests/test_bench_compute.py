"""bench/compute.py: the token count behind every bench's share of the compute peak is exact, and the
FLOP estimates are 2 x params x tokens (inference) and 6 x params x tokens (training)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def test_engine_tokens_counts_prompt_and_generated_tokens(tiny_policy_dir):
    from compute import EngineTokens, forward_flops, n_params, print_share, train_flops

    from cai.engines import SamplingParams, get_engine
    from cai.engines.base import Engine

    engine = get_engine("transformers", str(tiny_policy_dir), progress=False)
    convs = [[{"role": "user", "content": "Hello there."}], [{"role": "user", "content": "Why is the sky blue?"}]]
    before = Engine.generate
    with EngineTokens() as counted:
        out = engine.chat(convs, SamplingParams(temperature=1.0, max_tokens=3, n=2, seed=0))
        engine.score_next_token([engine.render(convs[0])], [1, 2])
    assert Engine.generate is before  # the wrapper is gone afterwards
    prompts = [len(engine.tokenizer(engine.render(c), add_special_tokens=False)["input_ids"]) for c in convs]
    generated = sum(x.num_tokens for c in out for x in c)
    assert generated > 0
    assert counted.tokens() == {engine.model: sum(prompts) + generated + prompts[0]}
    params = n_params(str(tiny_policy_dir))
    assert params > 0 and counted.flops() == forward_flops(params, counted.tokens()[engine.model])
    assert train_flops(params, 10) == 3 * forward_flops(params, 10)
    share = print_share("x", counted.flops(), 1.0, (counted.flops() * 4, "float32"))
    assert abs(share - 0.25) < 1e-12
