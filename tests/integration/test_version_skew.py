"""What the README's "Compatibility" section promises a client newer or older than its
sidecar, and the MLflow server versions it names as tested, against the real servers."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from mlflow_sidecar.core.errors import UnimplementedError, error_from_rpc
from mlflow_sidecar.v1 import tracking_pb2

README = Path(__file__).resolve().parents[2] / "README.md"
TRACKING = "/mlflow_sidecar.v1.ExperimentTrackingService"


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _compatibility_section() -> str:
    text = README.read_text()
    start = text.index("\n## Compatibility\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_an_rpc_the_sidecar_lacks_is_unimplemented(channel):
    future_rpc = channel.unary_unary(f"{TRACKING}/AnRpcOfALaterMinor")
    with pytest.raises(grpc.RpcError) as raised:
        future_rpc(b"", timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert isinstance(error_from_rpc(raised.value), UnimplementedError)


def test_a_field_the_sidecar_lacks_is_ignored(channel, run_id):
    # Field 999 (varint 1) stands for a field a later minor adds to GetRunRequest.
    request = tracking_pb2.GetRunRequest(run_id=run_id).SerializeToString()
    request += _varint(999 << 3) + _varint(1)
    get_run = channel.unary_unary(
        f"{TRACKING}/GetRun", response_deserializer=tracking_pb2.GetRunResponse.FromString
    )
    assert get_run(request, timeout=30).run.info.run_id == run_id


def test_the_mlflow_server_under_test_is_a_documented_one(mlflow_server):
    with urllib.request.urlopen(f"{mlflow_server.url}/version", timeout=30) as answer:
        version = answer.read().decode().strip()
    tested = re.search(r"Tested MLflow server versions: ([^\n]+)", _compatibility_section())
    assert tested, "README's Compatibility section names no tested MLflow server versions"
    named = re.findall(r"\d+\.\d+\.\d+", tested.group(1))
    assert version in named, (version, tested.group(1))
