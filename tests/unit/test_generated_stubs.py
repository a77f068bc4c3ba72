"""The committed stubs run on every protobuf and grpcio the package admits: the declared
floors are the versions the stubs were generated for (newer gencode refuses older
runtimes), and importing the stubs on the installed runtime warns of nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlflow_sidecar.v1

STUBS = Path(next(iter(mlflow_sidecar.v1.__path__)))
GENCODE_VERSION = re.compile(r"^# Protobuf Python Version: (\S+)$", re.MULTILINE)
GRPC_GENERATED_VERSION = re.compile(r"^GRPC_GENERATED_VERSION = '([^']+)'$", re.MULTILINE)


def _floor(distribution: str) -> str:
    """The `>=` floor of a base dependency, as the installed package's metadata declares it."""
    for requirement in metadata.requires("mlflow-sidecar") or []:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        floor = re.search(r">=\s*([0-9.]+)", requirement)
        if name and floor and name.group(0) == distribution and "extra ==" not in requirement:
            return floor.group(1)
    raise AssertionError(f"no floor declared for {distribution}")


def _generated(pattern: re.Pattern[str], suffix: str) -> set[str]:
    files = sorted(STUBS.glob(f"*{suffix}"))
    assert files, f"no generated *{suffix} in {STUBS}"
    return {match.group(1) for f in files for match in [pattern.search(f.read_text())] if match}


def test_protobuf_floor_is_the_gencode_version() -> None:
    assert _generated(GENCODE_VERSION, "_pb2.py") == {_floor("protobuf")}


def test_grpcio_floors_are_the_generated_grpc_version() -> None:
    generated = _generated(GRPC_GENERATED_VERSION, "_pb2_grpc.py")
    for distribution in ("grpcio", "grpcio-status", "grpcio-health-checking"):
        assert generated == {_floor(distribution)}, distribution


def test_stubs_import_without_any_warning() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            "import mlflow_sidecar.v1.tracking_pb2_grpc, mlflow_sidecar.v1.registry_pb2_grpc",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
