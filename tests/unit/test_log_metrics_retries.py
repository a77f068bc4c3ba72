"""LogMetrics with a request id is one call across its retries: points sent without a
timestamp take the first try's arrival, so a retry after a try that was cut short midway
(a deadline, a killed sidecar) sends the same points again, which MLflow holds once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from unittest import mock

import pytest

from mlflow_sidecar.core.errors import UnavailableError
from mlflow_sidecar.server.idempotency.ledger import RequestLedger
from mlflow_sidecar.server.servicers.tracking import TrackingServicer
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.fakes.mlflow_port import FakeMlflow
from tests.support.tracking_service import tracking_service_on


@pytest.fixture()
def gateway() -> FakeMlflow:
    return FakeMlflow()


def servicer_on(gateway: FakeMlflow, tmp_path, ledger: RequestLedger) -> Iterator[TrackingServicer]:
    with tracking_service_on(gateway, tmp_path, delivering=False) as (service, staging):
        yield TrackingServicer(service, mock.Mock(), staging, mock.Mock(), ledger)


@pytest.fixture()
def ledger(tmp_path) -> Iterator[RequestLedger]:
    opened = RequestLedger(tmp_path / "requests.db", retention_s=3600)
    yield opened
    opened.close()


@pytest.fixture()
def servicer(gateway, tmp_path, ledger) -> Iterator[TrackingServicer]:
    yield from servicer_on(gateway, tmp_path, ledger)


def request(run_id: str, points: int, request_id: str) -> pb.LogMetricsRequest:
    # No timestamps: the sidecar stamps them.
    return pb.LogMetricsRequest(
        run_id=run_id,
        metrics=[pb.Metric(key="loss", value=float(i), step=i) for i in range(points)],
        request_id=request_id,
    )


def run_of(servicer: TrackingServicer) -> str:
    experiment = servicer.CreateExperiment(pb.CreateExperimentRequest(name="e"), mock.Mock())
    started = servicer.StartRun(
        pb.StartRunRequest(experiment_id=experiment.experiment.experiment_id), mock.Mock()
    )
    return started.run.info.run_id


def history(gateway: FakeMlflow, run_id: str) -> list:
    return list(gateway.get_metric_history(run_id, "loss", page_size=25_000, page_token="").items)


def test_a_retry_after_a_try_cut_short_logs_each_point_once(servicer, gateway):
    run_id = run_of(servicer)
    # The first try's second batch of 1000 is lost: MLflow holds the first 1000 points.
    calls = {"n": 0}

    def fail_second() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise UnavailableError("cut short")

    gateway.on_call("log_batch", fail_second)
    with pytest.raises(UnavailableError):
        servicer.LogMetrics(request(run_id, 1500, "retried-1"), mock.Mock())
    time.sleep(0.01)  # the retry arrives later: a fresh stamp would differ
    answer = servicer.LogMetrics(request(run_id, 1500, "retried-1"), mock.Mock())
    assert answer.accepted_points == 1500
    held = history(gateway, run_id)
    assert len(held) == 1500
    assert len({point.timestamp_ms for point in held}) == 1


def test_the_first_arrival_outlives_a_restart(gateway, tmp_path):
    first = RequestLedger(tmp_path / "requests.db", retention_s=3600)
    seen = first.first_seen("/s/LogMetrics", "r-1")
    first.close()
    time.sleep(0.01)
    again = RequestLedger(tmp_path / "requests.db", retention_s=3600)
    assert again.first_seen("/s/LogMetrics", "r-1") == seen
    assert again.first_seen("/s/LogMetrics", "r-2") >= seen
    assert again.first_seen("/s/Other", "r-1") >= seen
    again.close()


def test_calls_without_a_request_id_are_stamped_when_they_arrive(servicer, gateway):
    run_id = run_of(servicer)
    servicer.LogMetrics(request(run_id, 1, ""), mock.Mock())
    time.sleep(0.01)
    servicer.LogMetrics(request(run_id, 1, ""), mock.Mock())
    # Two calls, two points: the same step and value, logged at two times.
    assert len(history(gateway, run_id)) == 2
