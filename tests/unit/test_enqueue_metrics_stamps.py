"""`enqueue_metrics` stamps points of timestamp 0 before it sends them: gRPC's retry policy
replays a StreamMetrics call whose answer was lost, and the sidecar stamps a point of
timestamp 0 on arrival, so an unstamped replay became a second point in MLflow."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.domain import MetricPoint
from mlflow_sidecar.v1 import tracking_pb2 as pb


class _CapturingStub:
    """Takes the place of the stub: keeps every StreamMetrics message sent."""

    def __init__(self) -> None:
        self.sent: list[pb.StreamMetricsRequest] = []

    def StreamMetrics(
        self, requests: Iterator[pb.StreamMetricsRequest], timeout: float | None = None
    ) -> pb.StreamMetricsResponse:
        self.sent.extend(requests)
        return pb.StreamMetricsResponse(
            accepted_points=sum(len(message.points) for message in self.sent)
        )


def _tracking(stub: _CapturingStub) -> GrpcExperimentTracking:
    fake: Any = stub
    return GrpcExperimentTracking(fake, timeout_s=5)


def test_points_of_timestamp_zero_go_out_stamped_with_the_current_time() -> None:
    stub = _CapturingStub()
    unstamped = MetricPoint("run", "loss", 0.5, step=1)
    before = now_ms()
    accepted = _tracking(stub).enqueue_metrics(
        [unstamped, MetricPoint("run", "reward", 1.5, step=1)]
    )
    after = now_ms()

    assert accepted == 2
    (message,) = stub.sent
    stamps = [point.timestamp_ms for point in message.points]
    assert all(before <= stamp <= after for stamp in stamps), stamps
    assert unstamped.timestamp_ms == 0  # the caller's point is left as it was


def test_points_with_a_timestamp_keep_it() -> None:
    stub = _CapturingStub()
    _tracking(stub).enqueue_metrics([MetricPoint("run", "loss", 0.5, timestamp_ms=1_234, step=1)])
    (message,) = stub.sent
    assert [point.timestamp_ms for point in message.points] == [1_234]
