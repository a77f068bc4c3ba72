"""The `mlflow` health service follows MLflow's reachability, logging each change once."""

from __future__ import annotations

import logging

from grpc_health.v1 import health, health_pb2

from mlflow_sidecar.core.errors import UnavailableError
from mlflow_sidecar.server.mlflow_probe import MLFLOW_HEALTH_SERVICE, MlflowProbe

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FlakyMlflow:
    """A ping that fails while `down` is set."""

    def __init__(self) -> None:
        self.down = False

    def ping(self) -> None:
        if self.down:
            raise UnavailableError("MLflow unreachable: connection refused")


def status(servicer: health.HealthServicer) -> int:
    request = health_pb2.HealthCheckRequest(service=MLFLOW_HEALTH_SERVICE)
    return servicer.Check(request, None).status


def test_status_follows_reachability_with_one_warning_per_change(caplog):
    mlflow = FlakyMlflow()
    servicer = health.HealthServicer()
    probe = MlflowProbe(mlflow.ping, servicer, interval_s=60)
    caplog.set_level(logging.INFO, logger="mlflow_sidecar.server.mlflow_probe")

    assert probe.probe_once() is True
    assert status(servicer) == SERVING
    mlflow.down = True
    probe.probe_once()
    probe.probe_once()
    assert status(servicer) == NOT_SERVING
    mlflow.down = False
    probe.probe_once()
    assert status(servicer) == SERVING

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "unreachable" in warnings[0] and "connection refused" in warnings[0]
    assert "reachable again" in warnings[1]


def test_unreachable_from_the_start_is_a_warning(caplog):
    mlflow = FlakyMlflow()
    mlflow.down = True
    servicer = health.HealthServicer()
    probe = MlflowProbe(mlflow.ping, servicer, interval_s=60)
    caplog.set_level(logging.INFO, logger="mlflow_sidecar.server.mlflow_probe")
    assert probe.probe_once() is False
    assert status(servicer) == NOT_SERVING
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_stop_reports_not_serving():
    servicer = health.HealthServicer()
    probe = MlflowProbe(FlakyMlflow().ping, servicer, interval_s=0.1)
    probe.start()
    probe.stop()
    assert status(servicer) == NOT_SERVING


def test_unknown_until_the_first_probe_answers():
    import threading

    answered = threading.Event()
    servicer = health.HealthServicer()
    probe = MlflowProbe(lambda: answered.wait(30) and None, servicer, interval_s=60)
    probe.start()
    try:
        assert status(servicer) == health_pb2.HealthCheckResponse.UNKNOWN
    finally:
        answered.set()
        probe.stop()


class DroppedOnce:
    """A ping whose first call meets a connection the server closed while it was idle."""

    def __init__(self) -> None:
        self.calls = 0

    def ping(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise UnavailableError("Connection aborted: ConnectionResetError(104)")


def test_one_failed_ping_tried_again_with_success_is_not_an_outage(caplog):
    mlflow = DroppedOnce()
    servicer = health.HealthServicer()
    probe = MlflowProbe(mlflow.ping, servicer, interval_s=60)
    caplog.set_level(logging.INFO, logger="mlflow_sidecar.server.mlflow_probe")
    assert probe.probe_once() is True
    assert status(servicer) == SERVING
    assert mlflow.calls == 2
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # "MLflow is reachable"


def test_an_outage_costs_two_pings_a_probe_not_more():
    mlflow = FlakyMlflow()
    mlflow.down = True
    calls = 0

    def counted() -> None:
        nonlocal calls
        calls += 1
        mlflow.ping()

    probe = MlflowProbe(counted, health.HealthServicer(), interval_s=60)
    assert probe.probe_once() is False
    assert calls == 2


def test_a_hung_mlflow_is_unreachable_once_a_ping_goes_unanswered():
    import threading

    released = threading.Event()
    pings: list[int] = []

    def hangs() -> None:
        pings.append(1)
        released.wait(30)

    servicer = health.HealthServicer()
    probe = MlflowProbe(hangs, servicer, interval_s=60, answer_s=0.2)
    try:
        # MLflow's own request timeout (30 s) is not waited for, nor tried twice.
        assert probe.probe_once() is False
        assert status(servicer) == NOT_SERVING
        # The unanswered ping is not joined by another one.
        assert probe.probe_once() is False
        assert len(pings) == 1
        released.set()
        assert probe.probe_once() is True
        assert status(servicer) == health_pb2.HealthCheckResponse.SERVING
    finally:
        released.set()
        probe.stop()
