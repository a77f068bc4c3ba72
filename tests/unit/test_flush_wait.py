"""FlushMetrics' `max_wait_s`, and the typed client's `flush_metrics(timeout_s=...)` that
sends it: 0 answers at once with what is pending."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest

from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.core.domain import FlushResult
from mlflow_sidecar.core.errors import InvalidArgumentError, error_from_rpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.unit.test_error_mapping import _start


class FlushRecorder:
    """The servicer's service: records the wait each flush was given."""

    def __init__(self) -> None:
        self.waits: list[float | None] = []

    def flush_metrics(self, run_id: str = "", *, timeout_s: float | None = None) -> FlushResult:
        self.waits.append(timeout_s)
        return FlushResult(3, 0, 0)


@pytest.fixture()
def served(tmp_path) -> Iterator[tuple[pb_grpc.ExperimentTrackingServiceStub, FlushRecorder]]:
    service = FlushRecorder()
    server, port = _start(tmp_path, service)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.ExperimentTrackingServiceStub(channel), service
    server.stop(0)


def test_the_sidecar_waits_max_wait_s_and_without_it_its_own_flush_timeout(served):
    stub, service = served
    assert stub.FlushMetrics(pb.FlushMetricsRequest(max_wait_s=0), timeout=30).pending_points == 3
    stub.FlushMetrics(pb.FlushMetricsRequest(max_wait_s=2.5), timeout=30)
    stub.FlushMetrics(pb.FlushMetricsRequest(), timeout=30)
    assert service.waits == [0, 2.5, None]


@pytest.mark.parametrize("wait", [-1.0, math.nan, math.inf])
def test_a_wait_that_is_no_length_of_time_is_invalid_argument(served, wait):
    stub, service = served
    with pytest.raises(grpc.RpcError) as err:
        stub.FlushMetrics(pb.FlushMetricsRequest(max_wait_s=wait), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_from_rpc(err.value).field == "max_wait_s"
    assert service.waits == []


class PendingStub:
    """FlushMetrics with points pending on the first call and none on later ones."""

    def __init__(self) -> None:
        self.calls: list[tuple[pb.FlushMetricsRequest, float | None]] = []

    def FlushMetrics(self, request, timeout=None):
        self.calls.append((request, timeout))
        pending = 7 if len(self.calls) == 1 else 0
        return pb.FlushMetricsResponse(pending_points=pending)


def test_flush_metrics_with_timeout_0_asks_once_without_waiting():
    stub = PendingStub()
    tracking = GrpcExperimentTracking(stub, timeout_s=30)  # type: ignore[arg-type]
    assert tracking.flush_metrics("r", timeout_s=0) == FlushResult(7, 0, 0)
    ((request, _),) = stub.calls
    assert request.HasField("max_wait_s") and request.max_wait_s == 0


@pytest.mark.parametrize("timeout", [-1.0, math.nan])
def test_flush_metrics_with_a_timeout_that_is_no_length_of_time_is_refused(timeout):
    stub = PendingStub()
    tracking = GrpcExperimentTracking(stub)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError) as err:
        tracking.flush_metrics("r", timeout_s=timeout)
    assert err.value.field == "timeout_s"
    assert stub.calls == []
