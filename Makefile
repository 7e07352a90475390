# Two commands for a newcomer: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PIPELINE_HOME ?= $(CURDIR)/.pipeline
export DAGSTER_HOME ?= $(PIPELINE_HOME)/dagster
DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000
# extra pytest arguments, e.g. `make test PYTEST_ARGS="pipeline_tests/domain -x"`
PYTEST_ARGS ?=
export MLFLOW_UI_URL ?= http://127.0.0.1:$(MLFLOW_PORT)
# Scratch space of make itself, never /tmp: inside the repository, under .pipeline/
# (which git ignores). `make test` gets its own folder there, removed when it ends.
SCRATCH := $(CURDIR)/.pipeline/tmp

.PHONY: setup system-deps demo dev test lint format bench bench-quick clean

# uv keeps lock files in its temp folder: point it at SCRATCH, so setup leaves /tmp as it was
$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet "uv>=0.5"
	@mkdir -p "$(SCRATCH)/uv"
	TMPDIR="$(SCRATCH)/uv" uv venv --quiet --allow-existing --python 3.11 $(VENV)
	TMPDIR="$(SCRATCH)/uv" uv sync --frozen
	@touch $@

setup: $(VENV)/.synced

demo: setup
	$(VENV)/bin/pipeline demo

dev: setup
	$(VENV)/bin/pipeline dev --dagster-port $(DAGSTER_PORT) --mlflow-port $(MLFLOW_PORT)

# ruff, and the layers of DESIGN.md as import-linter contracts (.importlinter)
lint: setup
	$(VENV)/bin/ruff format --check pipeline pipeline_tests benchmarks
	$(VENV)/bin/ruff check pipeline pipeline_tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

format: setup
	$(VENV)/bin/ruff format pipeline pipeline_tests benchmarks
	$(VENV)/bin/ruff check --fix pipeline pipeline_tests benchmarks

# Chromium (browser tests), Java 17 (PySpark), PostgreSQL (Postgres-backed instance):
# installed when run as root, else stops with the command to run (.ci/system-deps)
system-deps:
	@.ci/system-deps

# Every temporary file of the checks and the tests (pytest's tmp_path, tempfile users such
# as MLflow and Dagster, the JVMs PySpark starts, the Dagster instance and PIPELINE_HOME
# they see) goes to one folder under SCRATCH, removed at the end whether the tests passed
# or failed; the exit status is the tests'. `-XX:-UsePerfData`: no /tmp/hsperfdata_*.
# `dg check defs` loads the code location of [tool.dg] in pyproject.toml, offline (no uv,
# no telemetry); --no-check-yaml: the project has no component YAML to schema-check.
test: system-deps setup lint
	@set -eu; \
	mkdir -p "$(SCRATCH)"; \
	tmp=$$(mktemp -d "$(SCRATCH)/test.XXXXXX"); \
	trap 'rm -rf "$$tmp"; rmdir "$(SCRATCH)" 2>/dev/null || true' EXIT; \
	mkdir -p "$$tmp/home/dagster"; \
	printf 'telemetry:\n  enabled: false\n' > "$$tmp/home/dagster/dagster.yaml"; \
	export TMPDIR="$$tmp" PIPELINE_HOME="$$tmp/home" DAGSTER_HOME="$$tmp/home/dagster"; \
	export SPARK_SUBMIT_OPTS="-XX:-UsePerfData -Djava.io.tmpdir=$$tmp"; \
	export SPARK_LAUNCHER_OPTS="-XX:-UsePerfData"; \
	echo "temporary files in $$tmp (removed at the end)"; \
	echo "$(VENV)/bin/dg check defs --no-check-yaml"; \
	VIRTUAL_ENV="$(CURDIR)/$(VENV)" $(VENV)/bin/dg check defs --no-check-yaml; \
	echo "$(PY) -m pytest -q -p no:cacheprovider --timeout=900 --durations=30 --basetemp=$$tmp/pytest $(PYTEST_ARGS)"; \
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 --durations=30 --basetemp="$$tmp/pytest" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks

bench-quick: setup
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(PIPELINE_HOME)
