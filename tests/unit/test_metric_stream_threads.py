"""`MetricStream.log` takes no lock: points logged from many threads while batches are
cut (by count on the logging threads, by age on the sender) all arrive, once, with
their fields together; and a cut hands the sender the interpreter, but does not keep
waiting for a sender that is stalled."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from mlflow_sidecar.client import conversions as conv
from mlflow_sidecar.client import metric_stream
from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.v1 import tracking_pb2 as pb


class _CollectingCall:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.messages: list[pb.StreamMetricsRequest] = []
        self._gate = gate

    def with_call(
        self, requests: Iterator[pb.StreamMetricsRequest], timeout: float | None = None, **_: object
    ) -> tuple[pb.StreamMetricsResponse, None]:
        if self._gate is not None:
            self._gate.wait()
        batch = list(requests)
        self.messages.extend(batch)
        accepted = sum(len(s.values) for m in batch for s in m.series)
        return pb.StreamMetricsResponse(accepted_points=accepted), None


class _Stub:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.StreamMetrics = _CollectingCall(gate)


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    # Threads switch every microsecond, so cuts land between any two steps of a log().
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.usefixtures("tiny_switch_interval")
def test_points_from_many_threads_arrive_once_with_their_fields_together() -> None:
    stub = _Stub()
    # Small batches and a 1 ms age: count cuts on every thread and age cuts on the sender
    # race the appends all the time.
    stream = MetricStream(stub, max_batch_points=37, max_delay_s=0.001)  # type: ignore[arg-type]
    threads, per_thread = 4, 10_000

    def trainer(t: int) -> None:
        for i in range(per_thread):
            n = t * per_thread + i
            # A key of its own and a key all threads share (one row, appended concurrently).
            key = "shared" if i % 2 else f"own-{t}"
            stream.log("run", key, float(n), step=n, timestamp_ms=n + 1)

    workers = [threading.Thread(target=trainer, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert stream.close() == threads * per_thread

    sent = [p for m in stub.StreamMetrics.messages for p in conv.metric_columns_from_pb(m)]
    assert sorted(p.step for p in sent) == list(range(threads * per_thread))
    assert all(p.value == p.step and p.timestamp_ms == p.step + 1 for p in sent)
    assert {p.key for p in sent if p.step % per_thread % 2} == {"shared"}
    assert all(p.key == f"own-{p.step // per_thread}" for p in sent if not p.step % per_thread % 2)
    # Each thread's own points keep their order.
    for t in range(threads):
        own = [p.step for p in sent if p.key == f"own-{t}"]
        assert own == sorted(own)


def test_a_cut_waits_for_a_stalled_sender_once_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metric_stream, "_HANDOFF_S", 0.05)
    gate = threading.Event()
    stub = _Stub(gate)
    stream = MetricStream(stub, max_batch_points=10)  # type: ignore[arg-type]
    handoffs: list[bool] = []
    wait_for = stream._cond.wait_for

    def counting_wait_for(predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        handoffs.append(bool(wait_for(predicate, timeout)))
        return handoffs[-1]

    monkeypatch.setattr(stream._cond, "wait_for", counting_wait_for)
    for step in range(50):  # five full batches while the sidecar takes nothing
        stream.log("run", "loss", float(step), step=step, timestamp_ms=1 + step)
    assert handoffs == [False]

    gate.set()
    assert stream.flush() == 50
    for step in range(50, 60):  # the sender takes messages again: cuts hand off again
        stream.log("run", "loss", float(step), step=step, timestamp_ms=1 + step)
    assert stream.close() == 60
    assert len(handoffs) == 2
    sent = [p for m in stub.StreamMetrics.messages for p in conv.metric_columns_from_pb(m)]
    assert [p.step for p in sent] == list(range(60))
