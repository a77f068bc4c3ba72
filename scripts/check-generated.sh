#!/usr/bin/env bash
# Fails when the committed stubs differ from what protos/ generates.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
scripts/generate.sh "$tmp"
if ! diff -ru "$tmp/mlflow_sidecar/v1" stubs/mlflow_sidecar/v1 --exclude=__pycache__; then
  echo "stubs/mlflow_sidecar/v1 is out of date: run 'make generate' and commit the result" >&2
  exit 1
fi
echo "generated stubs are up to date"
