# emscope: the two commands a new user needs are `make demo` and `make test`.
#
# .venv holds exactly the versions in requirements/lock.txt (hashes checked), so a fresh
# machine gets what passed the tests; `make lock` re-resolves it. `make test-latest` and
# `make test-oldest` run the suite on the newest releases and on the declared minimums, each
# in its own environment.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
LOCK    := requirements/lock.txt
TORCH   := requirements/torch.txt
PIP     := pip==26.3
PYTEST  := -m pytest -p no:cacheprovider

.PHONY: demo test lint bench gpu-check lock test-latest test-oldest clean-venv

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

.venv: $(STAMP)

lint: .venv
	$(BIN)/ruff check src tests benchmarks requirements
	$(BIN)/ruff format --check src tests benchmarks requirements
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: .venv
	$(BIN)/python -m benchmarks

# One GPU, at most 10 minutes, no downloads: sampling (HF vs vLLM), steering, mean-diff,
# LoRA training, geometry and a CPU+GPU split model; writes docs/performance.md.
gpu-check: .venv
	$(BIN)/python -m benchmarks.gpu_check

demo: .venv
	$(BIN)/emscope run configs/synthetic.yaml --out runs/demo
	$(BIN)/emscope report runs/demo

# Re-resolve the lock: newest releases within pyproject's ranges, torch as in $(TORCH).
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(PIP) pip-tools
	.venv-lock/bin/pip-compile -q --generate-hashes --allow-unsafe --extra dev --strip-extras \
	    --no-emit-index-url --no-emit-find-links --constraint $(TORCH) \
	    --output-file $(LOCK) pyproject.toml
	rm -rf .venv-lock

# The whole suite (lint included) on the newest release of every dependency, torch included
# (on the set-up machine pip is capped at the torch releases on its disk: 2.14.1 there is a
# CUDA build, about 6 GB in the venv, that runs on the CPU).
test-latest:
	rm -rf .venv-latest && $(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	@grep -iE '^(torch|transformers|peft|tokenizers|numpy|pandas|openai)==' .venv-latest/versions.txt
	.venv-latest/bin/ruff check src tests benchmarks requirements
	.venv-latest/bin/ruff format --check src tests benchmarks requirements
	.venv-latest/bin/mypy
	.venv-latest/bin/python $(PYTEST)

# The tests on the minimum version of every runtime dependency that pyproject declares (torch
# excepted: the oldest torch this machine can install is the CPU wheel on disk).
test-oldest:
	rm -rf .venv-oldest && $(PY) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q $(PIP)
	.venv-oldest/bin/python -m pip install -q torch==2.13.0
	$(PY) requirements/minimums.py --skip torch > .venv-oldest/minimums.txt
	.venv-oldest/bin/python -m pip install -q -c .venv-oldest/minimums.txt -e . pytest
	.venv-oldest/bin/python -m pip freeze --exclude-editable > .venv-oldest/versions.txt
	.venv-oldest/bin/python $(PYTEST)

clean-venv:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock
