"""grpc's C core writes to stderr past Python's logging: log_format and log_level hold for it
too, against a TLS sidecar that plaintext clients knock on (each one a core log line)."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.certs import Pki, make_pki
from tests.support.sidecar_process import SidecarProcess

# What the core writes for a plaintext connection to a TLS listener, at its INFO.
HANDSHAKE_FAILED = "Handshake failed"
# A text log line of the sidecar: time, level, logger, [request id], message.
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \[")


def _tls_sidecar(
    tmp_path: Path, tracking_uri: str, pki: Pki, log_format: str, log_level: str
) -> SidecarProcess:
    return SidecarProcess(
        tmp_path / "data",
        tracking_uri,
        # stdout apart: the log file is stderr alone, where the core writes.
        stdout_path=tmp_path / "stdout",
        MLFLOW_SIDECAR__TLS__CERT_FILE=str(pki.server_cert),
        MLFLOW_SIDECAR__TLS__KEY_FILE=str(pki.server_key),
        MLFLOW_SIDECAR__LOG_FORMAT=log_format,
        MLFLOW_SIDECAR__LOG_LEVEL=log_level,
    )


def _wait_serving_over_tls(sidecar: SidecarProcess, pki: Pki, timeout_s: float = 90) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    deadline = time.monotonic() + timeout_s
    with grpc.secure_channel(sidecar.target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert sidecar.proc is not None and sidecar.proc.poll() is None, sidecar.log_tail()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"not SERVING: {sidecar.log_tail()}"
            time.sleep(0.2)


def _knock_in_plaintext(target: str, times: int = 3) -> None:
    """A misconfigured client: it speaks plaintext to the TLS listener and never connects."""
    for _ in range(times):
        with (
            grpc.insecure_channel(target) as channel,
            pytest.raises(grpc.FutureTimeoutError),
        ):
            grpc.channel_ready_future(channel).result(timeout=1.5)


def _stderr_after_knocks(
    tmp_path: Path, tracking_uri: str, log_format: str, log_level: str
) -> list[str]:
    pki = make_pki(tmp_path / "pki")
    sidecar = _tls_sidecar(tmp_path, tracking_uri, pki, log_format, log_level)
    sidecar.launch()
    try:
        _wait_serving_over_tls(sidecar, pki)
        _knock_in_plaintext(sidecar.target)
    finally:
        sidecar.stop()
    assert sidecar.proc is not None and sidecar.proc.returncode == 0, sidecar.log_tail()
    return [line for line in sidecar.log_path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("log_level", ["INFO", "ERROR"])
def test_json_logs_stay_json_and_at_their_level_when_plaintext_clients_knock(
    mlflow_server, tmp_path, log_level
):
    lines = _stderr_after_knocks(tmp_path, mlflow_server.url, "json", log_level)
    floor = logging.getLevelName(log_level)
    for line in lines:
        record = json.loads(line)  # raises for grpc's own plain text
        assert logging.getLevelName(record["level"]) >= floor, line
    if log_level == "INFO":
        assert any("serving on" in json.loads(line)["message"] for line in lines), lines


def test_text_logs_keep_the_cores_lines_below_the_level_out(mlflow_server, tmp_path):
    lines = _stderr_after_knocks(tmp_path, mlflow_server.url, "text", "WARNING")
    assert not [line for line in lines if HANDSHAKE_FAILED in line], lines
    for line in lines:
        if not line.startswith("  "):  # a traceback's lines are indented
            match = TEXT_LINE.match(line)
            assert match is not None and match.group(1) in ("WARNING", "ERROR", "CRITICAL"), line


def test_text_logs_at_info_show_the_cores_lines(mlflow_server, tmp_path):
    # The knocks do reach the core: at INFO its lines are written, as the level allows.
    lines = _stderr_after_knocks(tmp_path, mlflow_server.url, "text", "INFO")
    assert [line for line in lines if HANDSHAKE_FAILED in line], lines
