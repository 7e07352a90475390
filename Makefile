# Two commands for a newcomer: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PIPELINE_HOME ?= $(CURDIR)/.pipeline
export DAGSTER_HOME ?= $(PIPELINE_HOME)/dagster
DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000
export MLFLOW_UI_URL ?= http://127.0.0.1:$(MLFLOW_PORT)

.PHONY: setup demo dev test lint format bench bench-quick clean

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet "uv>=0.5"
	uv venv --quiet --allow-existing --python 3.11 $(VENV)
	uv sync --frozen
	@touch $@

setup: $(VENV)/.synced

demo: setup
	$(VENV)/bin/pipeline demo

dev: setup
	$(VENV)/bin/pipeline dev --dagster-port $(DAGSTER_PORT) --mlflow-port $(MLFLOW_PORT)

lint: setup
	$(VENV)/bin/ruff format --check pipeline pipeline_tests benchmarks
	$(VENV)/bin/ruff check pipeline pipeline_tests benchmarks

format: setup
	$(VENV)/bin/ruff format pipeline pipeline_tests benchmarks
	$(VENV)/bin/ruff check --fix pipeline pipeline_tests benchmarks

test: setup lint
	DAGSTER_HOME=$$(mktemp -d) $(VENV)/bin/dagster definitions validate -w workspace.yaml
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900

bench: setup
	$(PY) -m benchmarks

bench-quick: setup
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(PIPELINE_HOME)
