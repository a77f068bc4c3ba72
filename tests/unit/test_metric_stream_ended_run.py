"""A run ended through the sidecar (by another process, say) refuses its points for good:
the stream drops that run's points, says so once at the next flush, refuses the run's
later points at once, and goes on for its other runs without losing any of theirs."""

from __future__ import annotations

import pytest

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.core.errors import ErrorReason, FailedPreconditionError
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.support.metric_messages import AnsweredCall, RefusedCall, points_of

ENDED = "e" * 32
GOING = "g" * 32


def _run_ended(accepted: int, run_id: str = ENDED) -> RefusedCall:
    return RefusedCall(
        FailedPreconditionError(
            f"run {run_id} was ended (FINISHED) through the sidecar",
            reason=ErrorReason.RUN_ENDED,
            metadata={"run_id": run_id, "status": "FINISHED"},
        ),
        accepted,
    )


class _Sidecar:
    """Refuses every message with a point of ENDED once `ended` is set, as the spool does."""

    def __init__(self) -> None:
        self.ended = False
        self.steps: dict[str, list[int]] = {}

    def with_call(self, requests, timeout=None, **kwargs):  # type: ignore[no-untyped-def]
        accepted = 0
        for message in requests:
            points = points_of(message)
            if self.ended and any(p.run_id == ENDED for p in points):
                raise _run_ended(accepted)
            for point in points:
                self.steps.setdefault(point.run_id, []).append(point.step)
            accepted += len(points)
        return pb.StreamMetricsResponse(accepted_points=accepted), AnsweredCall(None)


class _Stub:
    def __init__(self, call: _Sidecar) -> None:
        self.StreamMetrics = call


def test_the_other_runs_keep_every_point_and_the_drop_is_reported_once() -> None:
    sidecar = _Sidecar()
    # Nothing is cut before a flush: the refusal comes after every point below is logged.
    stream = MetricStream(_Stub(sidecar), max_delay_s=60, max_batch_points=10**6)  # type: ignore[arg-type]
    stream.log(ENDED, "m", 0.0, step=0, timestamp_ms=5)
    stream.flush(timeout_s=30)
    sidecar.ended = True  # ended elsewhere: this stream does not know yet
    for step in range(500):
        stream.log(GOING, "m", 1.0, step=step, timestamp_ms=5)
        if step % 100 == 0:
            stream.log(ENDED, "m", 1.0, step=step + 1, timestamp_ms=5)
    with pytest.raises(FailedPreconditionError) as dropped:
        stream.flush(timeout_s=30)
    assert dropped.value.reason == ErrorReason.RUN_ENDED
    assert dropped.value.metadata["run_id"] == ENDED
    assert dropped.value.metadata["points"] == "5"
    assert stream.flush(timeout_s=30) == 501  # reported once; the stream goes on
    with pytest.raises(FailedPreconditionError) as refused:
        stream.log(ENDED, "m", 2.0, step=999, timestamp_ms=5)
    assert refused.value.reason == ErrorReason.RUN_ENDED
    for step in range(500, 600):
        stream.log(GOING, "m", 1.0, step=step, timestamp_ms=5)
    assert stream.close(timeout_s=30) == 601
    assert sidecar.steps[GOING] == list(range(600))
    assert sidecar.steps[ENDED] == [0]


def test_a_flush_that_does_not_report_keeps_the_report_for_one_that_does() -> None:
    sidecar = _Sidecar()
    sidecar.ended = True
    stream = MetricStream(_Stub(sidecar), max_delay_s=0.01, retry_budget_s=30)  # type: ignore[arg-type]
    stream.log(ENDED, "m", 1.0, step=1, timestamp_ms=5)
    stream.log(GOING, "m", 1.0, step=1, timestamp_ms=5)
    assert stream.flush(timeout_s=30, report_dropped=False) == 1
    with pytest.raises(FailedPreconditionError):
        stream.close(timeout_s=30)
    assert sidecar.steps == {GOING: [1]}


def test_a_close_reports_every_ended_run_whose_points_it_dropped() -> None:
    # Nothing can be raised after a close: its one report names every run.
    other = "o" * 32

    class _TwoEnded(_Sidecar):
        def with_call(self, requests, timeout=None, **kwargs):  # type: ignore[no-untyped-def]
            accepted = 0
            for message in requests:
                points = points_of(message)
                for run_id in (ENDED, other):
                    if self.ended and any(p.run_id == run_id for p in points):
                        raise _run_ended(accepted, run_id)
                accepted += len(points)
            return pb.StreamMetricsResponse(accepted_points=accepted), AnsweredCall(None)

    sidecar = _TwoEnded()
    sidecar.ended = True
    stream = MetricStream(_Stub(sidecar), max_delay_s=60, max_batch_points=10**6)  # type: ignore[arg-type]
    for run_id, points in ((ENDED, 2), (other, 3)):
        for step in range(points):
            stream.log(run_id, "m", 1.0, step=step, timestamp_ms=5)
    stream.log(GOING, "m", 1.0, step=0, timestamp_ms=5)
    with pytest.raises(FailedPreconditionError) as dropped:
        stream.close(timeout_s=30)
    assert dropped.value.reason == ErrorReason.RUN_ENDED
    assert sorted(dropped.value.metadata["run_id"].split(",")) == sorted([ENDED, other])
    assert dropped.value.metadata["points"] == "5"
    assert ENDED in dropped.value.message and other in dropped.value.message
    assert stream.close(timeout_s=30) == 1
