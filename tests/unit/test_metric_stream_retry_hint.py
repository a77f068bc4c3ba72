"""MetricStream waits as long as a full spool's RetryInfo asks before it sends again, sends
the points of a refused call in the next one, and fails with the sidecar's own reason once
refusals outlast its retry budget."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_status import rpc_status

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.errors import ErrorReason, ResourceExhaustedError, to_rpc_status
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.support.metric_messages import AnsweredCall, RefusedCall, points_of

HINT_S = 0.6


class _SpoolFull(grpc.RpcError, grpc.Call):
    """RESOURCE_EXHAUSTED as the sidecar answers it: SPOOL_FULL with a RetryInfo (or the
    refusal given)."""

    def __init__(self, error: ResourceExhaustedError | None = None) -> None:
        error = error or ResourceExhaustedError(
            "spool full", reason=ErrorReason.SPOOL_FULL, retry_after_s=HINT_S
        )
        status = to_rpc_status(error)
        self._details = status.message
        self._trailers = (
            (conv.ACCEPTED_POINTS_METADATA, "0"),
            (rpc_status.GRPC_DETAILS_METADATA_KEY, status.SerializeToString()),
        )

    def code(self):
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


class _FullOnce:
    """Refuses the first call with a full spool, accepts every later one; notes the times."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def with_call(
        self, requests: Iterator[pb.StreamMetricsRequest], timeout: float | None = None, **_: object
    ) -> tuple[pb.StreamMetricsResponse, None]:
        self.calls.append(time.monotonic())
        batch = list(requests)
        if len(self.calls) == 1:
            raise _SpoolFull()
        accepted = sum(len(s.values) for m in batch for s in m.series) + sum(
            len(m.points) for m in batch
        )
        return pb.StreamMetricsResponse(accepted_points=accepted), None


class _Stub:
    def __init__(self) -> None:
        self.StreamMetrics = _FullOnce()


def test_a_full_spool_is_not_asked_again_before_its_retry_hint() -> None:
    stub = _Stub()
    stream = MetricStream(stub, max_batch_points=1, max_delay_s=0.001)  # type: ignore[arg-type]
    stream.log("r" * 32, "loss", 1.0, step=0)
    assert stream.close(timeout_s=10) == 1
    first, second = stub.StreamMetrics.calls[:2]
    assert second - first >= HINT_S * 0.9


class _AlwaysTooManyStreams:
    def with_call(
        self, requests: Iterator[pb.StreamMetricsRequest], timeout: float | None = None, **_: object
    ) -> tuple[pb.StreamMetricsResponse, None]:
        list(requests)
        raise _SpoolFull(
            ResourceExhaustedError(
                "refused: server.max_streaming_rpcs",
                reason=ErrorReason.TOO_MANY_STREAMS,
                metadata={"max_streaming_rpcs": "2"},
                retry_after_s=0.01,
            )
        )


def test_a_stream_refused_past_its_budget_fails_with_the_sidecars_reason() -> None:
    stub = _Stub()
    stub.StreamMetrics = _AlwaysTooManyStreams()  # type: ignore[assignment]
    stream = MetricStream(
        stub,  # type: ignore[arg-type]
        max_batch_points=1,
        max_delay_s=0.001,
        retry_budget_s=0.2,
    )
    stream.log("r" * 32, "loss", 1.0, step=0)
    with pytest.raises(ResourceExhaustedError) as failed:
        stream.close(timeout_s=10)
    assert failed.value.reason == ErrorReason.TOO_MANY_STREAMS
    assert "server.max_streaming_rpcs" in failed.value.message
    assert failed.value.metadata == {"max_streaming_rpcs": "2"}


class _RefusedAfterFirstMessage:
    """Refuses the first call once its first message went out, and then, as grpc's thread
    that reads a call's requests may, asks that ended call for its requests again; answers
    every later call in full."""

    def __init__(self) -> None:
        self._ended: Iterator[pb.StreamMetricsRequest] | None = None
        self.taken_by_the_ended_call: list[pb.StreamMetricsRequest] = []

    def with_call(
        self, requests: Iterator[pb.StreamMetricsRequest], timeout: float | None = None, **_: object
    ) -> tuple[pb.StreamMetricsResponse, None]:
        if self._ended is None:
            next(requests)
            self._ended = requests
            raise _SpoolFull(
                ResourceExhaustedError("full", reason=ErrorReason.SPOOL_FULL, retry_after_s=0.01)
            )
        self.taken_by_the_ended_call += list(self._ended)
        batch = list(requests)
        return pb.StreamMetricsResponse(
            accepted_points=sum(len(s.values) for m in batch for s in m.series)
        ), None


def test_a_refused_calls_requests_give_nothing_more_once_it_ended() -> None:
    # The message the refused call held goes back to the queue; were the ended call's
    # requests still to take it, it would wait in flight where no call sends it, and the
    # stream would never deliver it (a refused trainer stuck until its flush timed out).
    stub = _Stub()
    refusing = _RefusedAfterFirstMessage()
    stub.StreamMetrics = refusing  # type: ignore[assignment]
    stream = MetricStream(
        stub,  # type: ignore[arg-type]
        max_batch_points=3,
        max_delay_s=0.001,
        call_window_s=0.05,
    )
    for step in range(3):
        stream.log("r" * 32, "loss", float(step), step=step)
    assert stream.close(timeout_s=30) == 3
    assert refusing.taken_by_the_ended_call == []


class _DrainingSpool:
    """A full spool that drains as MLflow takes points: each call after the first has one
    message accepted, then meets SPOOL_FULL."""

    def __init__(self) -> None:
        self.calls = 0
        self.steps: list[int] = []

    def with_call(self, requests, timeout=None, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        accepted = 0
        for message in requests:
            if self.calls > 1 and accepted:
                raise RefusedCall(
                    ResourceExhaustedError(
                        "spool full", reason=ErrorReason.SPOOL_FULL, retry_after_s=0.02
                    ),
                    accepted,
                )
            points = points_of(message)
            self.steps.extend(p.step for p in points)
            accepted += len(points)
        return pb.StreamMetricsResponse(accepted_points=accepted), AnsweredCall(
            conv.SERIES_COLUMNS_FIXED
        )


def test_a_stream_the_sidecar_keeps_taking_points_from_outlasts_its_retry_budget():
    # Each call makes progress before it is refused: the stream is not refused, only
    # slowed, and gives up only on a sidecar that takes nothing for its whole budget.
    stub = _Stub()
    stub.StreamMetrics = sidecar = _DrainingSpool()  # type: ignore[assignment]
    stream = MetricStream(stub, max_delay_s=60, retry_budget_s=0.3, max_message_bytes=4096)  # type: ignore[arg-type]
    for step in range(3000):
        stream.log("r" * 32, "loss", 1.0, step=step, timestamp_ms=5)
    assert stream.close(timeout_s=60) == 3000
    assert sidecar.steps == list(range(3000))
    assert sidecar.calls > 10
