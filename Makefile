# Every target installs what it needs; `make serve` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
PROTO_FILES := $(wildcard protos/mlflow_sidecar/v1/*.proto)

.PHONY: serve test lint typecheck proto-lint proto-breaking generate check-generated hadolint pytest pytest-postgres unit integration bench bench-quick clean
.PHONY: compat-lowest compat-pythons

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.server: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[server]'
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.server
	$(BIN)/pip install -q -e '.[server,dev]'
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## serve: start the sidecar on 127.0.0.1:50051 with the embedded MLflow store in ./.sidecar-data
serve: $(VENV)/.server
	MLFLOW_SIDECAR__DATA_DIR=$${MLFLOW_SIDECAR__DATA_DIR:-$(CURDIR)/.sidecar-data} $(BIN)/mlflow-sidecar serve

## test: ruff, mypy, buf lint + breaking, generated-code drift, hadolint, unit + integration
## tests (mlflow server on SQLite), then the integration suite again on PostgreSQL, then the
## client alone on its lowest supported dependencies and on the other Pythons
test: lint typecheck proto-lint proto-breaking check-generated hadolint pytest pytest-postgres compat-lowest compat-pythons

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy
	$(BIN)/mypy --python-version 3.10

proto-lint: $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code

proto-breaking: $(BUF) $(VENV)/.server
	scripts/buf-breaking.sh

## generate: regenerate stubs/mlflow_sidecar/v1 from protos/ (grpc_tools.protoc + mypy-protobuf)
generate: $(VENV)/.dev
	scripts/generate.sh stubs

check-generated: $(VENV)/.dev
	scripts/check-generated.sh

hadolint: $(VENV)/.dev
	$(BIN)/hadolint Dockerfile

# The integration suite runs the Node.js client from node_modules.
pytest: $(VENV)/.dev $(BUF)
	$(BIN)/pytest

## pytest-postgres: the integration suite against an mlflow server on a throwaway PostgreSQL cluster
pytest-postgres: $(VENV)/.dev $(BUF)
	MLFLOW_SIDECAR_TEST_BACKEND=postgresql $(BIN)/pytest tests/integration

## compat-lowest: the client alone in a fresh venv with every base dependency at its floor
## (protobuf, grpcio, ...) on the oldest supported Python present, then its unit tests
compat-lowest: $(VENV)/.dev
	scripts/compat-test.sh lowest

## compat-pythons: the client alone with the newest dependencies on Python 3.10, 3.12, 3.13
compat-pythons: $(VENV)/.dev
	scripts/compat-test.sh pythons

unit: $(VENV)/.dev
	$(BIN)/pytest tests/unit

integration: $(VENV)/.dev $(BUF)
	$(BIN)/pytest tests/integration

## bench: side-by-side benchmarks (not part of test); writes bench/results.json
bench: $(VENV)/.dev
	$(BIN)/python bench/run.py

bench-quick: $(VENV)/.dev
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) .venv-codegen .venv-compat node_modules .sidecar-data .pytest_cache .mypy_cache .ruff_cache
