"""A stream that refuses `log` (closed, failed, full with `when_full="raise"`, a run that
ended) raises a fresh error each time: raising one stored error object again and again
grew its traceback by every raise's frames, which a trainer that catches the error and
goes on kept alive without bound."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import TracebackType

import pytest

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.core.errors import (
    FailedPreconditionError,
    ResourceExhaustedError,
    SidecarError,
)
from mlflow_sidecar.v1 import tracking_pb2 as pb

REFUSALS = 2_000
# The frames between the test's `log` call and the raise, with room to spare.
FEW_FRAMES = 10


def _frames(traceback: TracebackType | None) -> int:
    count = 0
    while traceback is not None:
        count += 1
        traceback = traceback.tb_next
    return count


def _last_refusal(stream: MetricStream, kind: type[SidecarError], start: int) -> SidecarError:
    last: SidecarError | None = None
    for step in range(start, start + REFUSALS):
        try:
            stream.log("r" * 32, "loss", 1.0, step=step, timestamp_ms=5)
        except kind as exc:
            last = exc
    assert last is not None, f"log() never raised {kind.__name__}"
    return last


class _Held:
    """A StreamMetrics that takes a call's messages and answers once released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def with_call(
        self, requests: Iterator[pb.StreamMetricsRequest], timeout: float | None = None, **_: object
    ) -> tuple[pb.StreamMetricsResponse, None]:
        accepted = sum(len(s.values) for m in requests for s in m.series)
        self.release.wait(60)
        return pb.StreamMetricsResponse(accepted_points=accepted), None


class _Stub:
    def __init__(self) -> None:
        self.StreamMetrics = _Held()


def test_a_closed_streams_refusals_keep_a_short_traceback() -> None:
    stub = _Stub()
    stub.StreamMetrics.release.set()
    stream = MetricStream(stub)  # type: ignore[arg-type]
    stream.close(timeout_s=30)
    last = _last_refusal(stream, FailedPreconditionError, 0)
    assert last.reason == "CLIENT_CLOSED"
    assert _frames(last.__traceback__) <= FEW_FRAMES


def test_a_full_streams_refusals_keep_a_short_traceback() -> None:
    stub = _Stub()
    stream = MetricStream(
        stub,  # type: ignore[arg-type]
        max_batch_points=5,
        max_buffered_points=10,
        max_delay_s=0.01,
        when_full="raise",
    )
    try:
        with pytest.raises(ResourceExhaustedError):
            for step in range(1_000):
                stream.log("r" * 32, "loss", 1.0, step=step, timestamp_ms=5)
        last = _last_refusal(stream, ResourceExhaustedError, 1_000)
        assert last.reason == "CLIENT_BUFFER_FULL"
        assert _frames(last.__traceback__) <= FEW_FRAMES
    finally:
        stub.StreamMetrics.release.set()
        stream.close(timeout_s=30)
