"""One retry budget per hop: a typed-client call costs at most `retry.max_tries` MLflow
attempts, however many tries the client's own retry policy allows.

MLflow here is a loopback HTTP server that answers 503 to everything and counts the
requests; the sidecar retries it `retry.max_tries` times, then answers UNAVAILABLE with
`grpc-retry-pushback-ms: -1`, so the client's gRPC retry policy (5 tries) adds none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.ports import ExperimentTracking
from mlflow_sidecar.core.domain import Metric
from mlflow_sidecar.core.errors import ErrorReason, UnavailableError
from tests.integration.conftest import RunningSidecar, sidecar_config

MAX_TRIES = 3
CLIENT_ATTEMPTS = 5


class Always503:
    """An HTTP server on a loopback port that answers 503 to every request, counting them."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                with outer._lock:
                    outer.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            # http.server dispatches to do_<METHOD>; every method gets the same refusal.
            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def take(self) -> int:
        """The requests counted since the last call."""
        with self._lock:
            count, self.requests = self.requests, 0
        return count

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture()
def down_mlflow() -> Iterator[Always503]:
    server = Always503()
    yield server
    server.close()


@pytest.fixture()
def tracking(tmp_path: Path, down_mlflow: Always503) -> Iterator[ExperimentTracking]:
    config = sidecar_config(
        tmp_path,
        down_mlflow.url,
        retry={"max_tries": MAX_TRIES, "factor_s": 0.01, "max_backoff_s": 0.05, "max_time_s": 20},
        # The reachability probe asks MLflow too: once at start, then not during the test.
        mlflow={"probe_interval_s": 3600},
    )
    sidecar = RunningSidecar(config)
    _wait_for_the_first_probe(sidecar.target)
    container = ClientContainer()
    container.config.from_dict(
        {"target": sidecar.target, "timeout_s": 30.0, "max_attempts": CLIENT_ATTEMPTS}
    )
    try:
        yield container.experiment_tracking()
    finally:
        container.shutdown_resources()
        sidecar.stop()


def _wait_for_the_first_probe(target: str) -> None:
    """Until the `mlflow` health service has its first answer (NOT_SERVING here)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reply = stub.Check(health_pb2.HealthCheckRequest(service="mlflow"), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            time.sleep(0.05)
    raise AssertionError("the mlflow probe never answered")


CALLS: dict[str, Callable[[ExperimentTracking], object]] = {
    "get_run": lambda t: t.get_run("0" * 32),
    "log_metrics": lambda t: t.log_metrics("0" * 32, [Metric("loss", 0.5, 1, 0)]),
    "create_experiment": lambda t: t.create_experiment("budget"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_one_call_costs_at_most_max_tries_mlflow_attempts(tracking, down_mlflow, name):
    down_mlflow.take()  # whatever starting the sidecar cost
    with pytest.raises(UnavailableError) as err:
        CALLS[name](tracking)
    attempts = down_mlflow.take()
    assert 1 <= attempts <= MAX_TRIES, f"{name} cost {attempts} MLflow requests"
    assert err.value.reason == ErrorReason.MLFLOW_UNAVAILABLE
