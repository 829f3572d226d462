"""Shared fixtures. Tiny models are built once per session; the real embedded model is pulled by
`make test` before pytest starts (tests that need it are marked ``slow``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smol_path() -> str:
    """Folder of the real embedded model (SmolLM2-135M-Instruct)."""
    from cai.models import DEFAULT_MODEL, ModelNotFoundError, resolve

    try:
        return resolve(DEFAULT_MODEL)
    except ModelNotFoundError as e:
        pytest.fail(f"{e}\n(`make test` pulls it before running pytest)")


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, smol_path) -> Path:
    from cai.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "policy", "policy")


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, smol_path) -> Path:
    from cai.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "reward", "reward")


@pytest.fixture
def store(tmp_path):
    from cai.store import Store

    s = Store(tmp_path / "cai.duckdb")
    s.init()
    return s


@pytest.fixture(scope="session")
def constitution_path() -> Path:
    return REPO / "constitutions" / "harmless.yaml"


@pytest.fixture(scope="session")
def demo_prompt_files() -> list[Path]:
    return [REPO / "data" / "prompts" / "red_team.jsonl", REPO / "data" / "prompts" / "helpful.jsonl"]


@pytest.fixture(scope="session")
def brief_policy_dir(tmp_path_factory, smol_path) -> Path:
    """A tiny policy taught to give one of a few short replies and stop (it samples EOS)."""
    from cai.testing import build_tiny_model, train_brief

    return train_brief(build_tiny_model(tmp_path_factory.mktemp("tiny") / "brief", "policy"))


@pytest.fixture
def causal_lm_loads(monkeypatch) -> list:
    """The folders ``AutoModelForCausalLM.from_pretrained`` is called with during the test (to count
    model copies: with LoRA the reference must be the policy itself, not a second load)."""
    from transformers import AutoModelForCausalLM

    loads: list = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    return loads
