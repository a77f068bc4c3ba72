"""A sidecar takes no StreamMetrics message of more points than its spool holds: the
stream cuts its messages to the limit the sidecar announces, and cuts again the messages
of a refused call when the refusal names the limit, keeping each series' order."""

from __future__ import annotations

import grpc
import pytest

from mlflow_sidecar.client.metric_stream import MetricStream, _split_messages
from mlflow_sidecar.core.errors import ErrorReason, ResourceExhaustedError
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.support.metric_messages import AnsweredCall, RefusedCall, points_of


def _too_many_points(limit: int | None) -> RefusedCall:
    """The refusal of a message over the spool's size, with the limit or without it."""
    return RefusedCall(
        ResourceExhaustedError(
            "too many points",
            reason=ErrorReason.TOO_MANY_POINTS,
            metadata={"max_points": str(limit)} if limit is not None else None,
        )
    )


class _Sidecar:
    """StreamMetrics of a sidecar whose spool holds `limit` points; it refuses a larger
    message as the real one does (with the limit unless `says_limit` is False)."""

    def __init__(self, limit: int, *, announces: bool, says_limit: bool = True) -> None:
        self.limit, self.announces, self.says_limit = limit, announces, says_limit
        self.messages: list[int] = []
        self.refusals = 0
        self.points: dict[str, list[int]] = {}

    def with_call(self, requests, timeout=None, **kwargs):  # type: ignore[no-untyped-def]
        accepted = 0
        for message in requests:
            count = sum(len(s.values) for s in message.series)
            if count > self.limit:
                self.refusals += 1
                raise _too_many_points(self.limit if self.says_limit else None)
            self.messages.append(count)
            for point in points_of(message):
                self.points.setdefault(point.key, []).append(point.step)
            accepted += count
        return pb.StreamMetricsResponse(accepted_points=accepted), AnsweredCall(
            None, max_message_points=self.limit if self.announces else None
        )


class _Stub:
    def __init__(self, call: _Sidecar) -> None:
        self.StreamMetrics = call


def _log(stream: MetricStream, steps: int) -> None:
    for step in range(steps):
        stream.log_metrics("run", {"a": float(step), "b": float(step)}, step=step, timestamp_ms=5)


@pytest.mark.parametrize("announces", [True, False])
def test_every_point_arrives_once_in_order_in_messages_within_the_limit(announces: bool) -> None:
    sidecar = _Sidecar(limit=70, announces=announces)
    stream = MetricStream(_Stub(sidecar), max_delay_s=0.01, retry_budget_s=30)  # type: ignore[arg-type]
    _log(stream, 2000)
    assert stream.close(timeout_s=60) == 4000
    assert max(sidecar.messages) <= 70
    assert sidecar.points == {"a": list(range(2000)), "b": list(range(2000))}


def test_the_announced_limit_cuts_messages_before_any_refusal() -> None:
    sidecar = _Sidecar(limit=70, announces=True)
    stream = MetricStream(_Stub(sidecar), max_delay_s=0.01, retry_budget_s=30)  # type: ignore[arg-type]
    stream.log("run", "a", 1.0, step=0, timestamp_ms=5)
    stream.flush(timeout_s=60)  # the first call: the sidecar announced its limit
    _log(stream, 1000)
    stream.close(timeout_s=60)
    assert sidecar.refusals == 0
    assert max(sidecar.messages) <= 70
    assert sidecar.points["b"] == list(range(1000))


def test_a_refusal_that_names_no_limit_fails_the_stream_at_once() -> None:
    sidecar = _Sidecar(limit=70, announces=False, says_limit=False)
    stream = MetricStream(_Stub(sidecar), max_delay_s=0.01, retry_budget_s=3600)  # type: ignore[arg-type]
    _log(stream, 1000)
    with pytest.raises(ResourceExhaustedError) as err:
        stream.flush(timeout_s=60)  # not retried for the hour of its budget
    assert err.value.reason == ErrorReason.TOO_MANY_POINTS


def test_split_keeps_columns_and_order_of_both_forms() -> None:
    fixed = pb.MetricSeries(
        run_id="r", key="f", values=[0, 1, 2, 3, 4], fixed_timestamps_ms=[5] * 5
    )
    fixed.fixed_steps.extend(range(5))
    message = pb.StreamMetricsRequest(
        points=[pb.MetricPoint(run_id="r", key="p", value=v, step=v) for v in range(3)],
        series=[
            pb.MetricSeries(
                run_id="r", key="v", values=[0, 1, 2], timestamps_ms=[7] * 3, steps=[0, 1, 2]
            ),
            fixed,
        ],
    )
    small = pb.StreamMetricsRequest(points=[pb.MetricPoint(run_id="r", key="s")])
    pieces = _split_messages([(message, 11), (small, 1)], 4)
    assert [count for _, count in pieces] == [4, 4, 3, 1]
    assert pieces[-1][0] is small
    assert all(
        sum(len(s.values) for s in piece.series) + len(piece.points) == count
        for piece, count in pieces
    )
    points = [p.step for piece, _ in pieces for p in piece.points]
    assert points == [0, 1, 2, 0]
    by_key: dict[str, list[tuple[float, int, int]]] = {}
    for piece, _ in pieces:
        for s in piece.series:
            stamps = list(s.timestamps_ms) or list(s.fixed_timestamps_ms)
            steps = list(s.steps) or list(s.fixed_steps)
            assert len(stamps) == len(steps) == len(s.values)
            by_key.setdefault(s.key, []).extend(zip(s.values, stamps, steps, strict=True))
    assert by_key == {
        "v": [(float(i), 7, i) for i in range(3)],
        "f": [(float(i), 5, i) for i in range(5)],
    }


class _TooLargeForGrpc(RefusedCall):
    """gRPC's own refusal of a message over the receiver's limit: no sidecar details."""

    def __init__(self, size: int, limit: int) -> None:
        self._code = grpc.StatusCode.RESOURCE_EXHAUSTED
        self._details = f"Received message larger than max ({size} vs. {limit})"
        self._trailers = ()


class _SmallMessageSidecar:
    """A sidecar whose `server.max_message_bytes` is below the stream's messages."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.refusals = 0
        self.steps: list[int] = []

    def with_call(self, requests, timeout=None, **kwargs):  # type: ignore[no-untyped-def]
        accepted = 0
        for message in requests:
            size = message.ByteSize()
            if size > self.limit_bytes:
                self.refusals += 1
                raise _TooLargeForGrpc(size, self.limit_bytes)
            points = points_of(message)
            self.steps.extend(p.step for p in points if p.key == "a")
            accepted += len(points)
        return pb.StreamMetricsResponse(accepted_points=accepted), AnsweredCall(None)


def test_a_message_over_the_sidecars_byte_limit_is_sent_again_in_smaller_ones() -> None:
    sidecar = _SmallMessageSidecar(limit_bytes=64 * 1024)
    stream = MetricStream(_Stub(sidecar), max_delay_s=60, retry_budget_s=5)  # type: ignore[arg-type]
    _log(stream, 20_000)
    assert stream.close(timeout_s=30) == 40_000
    assert sidecar.steps == list(range(20_000))
    assert 1 <= sidecar.refusals <= 3
