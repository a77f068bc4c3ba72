#!/usr/bin/env bash
# Generates the Python stubs of protos/ into the directory given (default: stubs).
# protoc and the gRPC plugin come from the pinned generator venv (scripts/codegen-requirements.txt);
# the mypy-protobuf plugin from the dev venv.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-stubs}"
bin=".venv/bin"
codegen="${CODEGEN_VENV:-.venv-codegen}"
requirements="scripts/codegen-requirements.txt"
if ! cmp -s "$requirements" "$codegen/requirements.txt" 2>/dev/null; then
  rm -rf "$codegen"
  "${PYTHON:-python3}" -m venv "$codegen"
  "$codegen/bin/pip" install -q -r "$requirements"
  cp "$requirements" "$codegen/requirements.txt"
fi
rm -f "$out"/mlflow_sidecar/v1/*_pb2*.py "$out"/mlflow_sidecar/v1/*_pb2*.pyi "$out"/mlflow_sidecar/v1/descriptors.binpb
mkdir -p "$out/mlflow_sidecar/v1"
"$codegen/bin/python" -m grpc_tools.protoc -Iprotos \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  --descriptor_set_out="$out/mlflow_sidecar/v1/descriptors.binpb" --include_source_info \
  protos/mlflow_sidecar/v1/*.proto
# descriptors.binpb: the same files with their comments, for server reflection (the
# runtime's descriptors keep none).
# PEP 561: the generated modules carry their types (.pyi) for a trainer's type checker.
touch "$out/mlflow_sidecar/v1/py.typed"
