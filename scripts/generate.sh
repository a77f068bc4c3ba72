#!/usr/bin/env bash
# Generates the Python stubs of protos/ into the directory given (default: stubs).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-stubs}"
bin=".venv/bin"
rm -f "$out"/mlflow_sidecar/v1/*_pb2*.py "$out"/mlflow_sidecar/v1/*_pb2*.pyi
mkdir -p "$out/mlflow_sidecar/v1"
"$bin/python" -m grpc_tools.protoc -Iprotos \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  protos/mlflow_sidecar/v1/*.proto
