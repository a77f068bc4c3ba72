"""A `MetricStream` dropped without close() is collected and closes in the background: its
sender sends every point it held, once, then ends; nothing of it outlives that."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.support.metric_messages import points_of

POINTS = 5000
WAIT_S = 60.0  # for the sender to end: generous, a shared machine may be slow


class _GatedCall:
    """StreamMetrics that takes nothing until `gate` is set, then every message."""

    def __init__(self, gate: threading.Event) -> None:
        self.messages: list[pb.StreamMetricsRequest] = []
        self.entered = threading.Event()
        self._gate = gate

    def with_call(
        self, requests: Iterator[pb.StreamMetricsRequest], timeout: float | None = None, **_: object
    ) -> tuple[pb.StreamMetricsResponse, None]:
        self.entered.set()
        self._gate.wait()
        batch = list(requests)
        self.messages.extend(batch)
        accepted = sum(len(s.values) for m in batch for s in m.series)
        return pb.StreamMetricsResponse(accepted_points=accepted), None


class _Stub:
    def __init__(self, gate: threading.Event) -> None:
        self.StreamMetrics = _GatedCall(gate)


def _log_and_drop(stub: _Stub) -> tuple[weakref.ref[MetricStream], threading.Thread]:
    """Log POINTS points to a new stream and drop it; returns it, weakly, and its sender."""
    before = set(threading.enumerate())
    # A batch is due by neither count nor age: only a close sends these points.
    stream = MetricStream(stub, max_batch_points=POINTS + 1, max_delay_s=3600)  # type: ignore[arg-type]
    (sender,) = {t for t in threading.enumerate() if t.name == "metric-stream"} - before
    for step in range(POINTS):
        stream.log("run", "loss", float(step), step=step, timestamp_ms=1 + step)
    return weakref.ref(stream), sender


def test_a_dropped_stream_sends_what_it_held_and_its_sender_ends() -> None:
    gate = threading.Event()
    stub = _Stub(gate)
    stream, sender = _log_and_drop(stub)
    gc.collect()
    assert stream() is None, "the stream outlives its caller's references"
    assert stub.StreamMetrics.entered.wait(WAIT_S), "the dropped stream sent nothing"
    assert sender.is_alive()  # held in the call by the gate
    gate.set()

    sender.join(WAIT_S)
    assert not sender.is_alive(), "the sender of a dropped stream never ended"
    points = [point for message in stub.StreamMetrics.messages for point in points_of(message)]
    assert sorted(point.step for point in points) == list(range(POINTS))
