# The README's commands. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel here; on a GPU machine: make setup TORCH=torch
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help setup run flow test test-fast lint bench clean
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,diffusers,onnx]"
	touch $@

setup: $(VENV)/.installed  ## make the virtual environment (CPU torch where no GPU is present)

run: setup  ## run the whole chain with DVC (default profile) and print the leaderboard
	slimstep repro

flow: setup  ## run the same DAG as a Prefect flow (parallel where the DAG allows)
	slimstep run

test: setup  ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: setup  ## unit and exact-maths tests only (no DVC / Prefect / MLflow end to end), two workers, under 2 minutes
	$(PY) -m pytest -q -n 2 -m "not slow and not gpu"

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

bench: setup  ## benchmarks: tables + benchmarks/results/*.json
	slimstep bench

clean:  ## remove resume checkpoints (dvc gc cleans the cache)
	slimstep clean
