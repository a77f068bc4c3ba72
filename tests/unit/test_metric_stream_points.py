"""`MetricStream.log` keeps a batch as columns per run and key and sends them as packed
series: the points the sidecar would refuse are still refused at the call that logs
them, and what it sends reads back as the points logged."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.core.errors import FailedPreconditionError
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.support.metric_messages import AnsweredCall, points_of


class _StreamCall:
    def __init__(self, forms: str | None) -> None:
        self.forms = forms
        self.messages: list[pb.StreamMetricsRequest] = []
        # The messages of each call.
        self.calls: list[list[pb.StreamMetricsRequest]] = []

    def with_call(self, requests, timeout=None, **kwargs):
        batch = list(requests)
        self.messages.extend(batch)
        self.calls.append(batch)
        accepted = sum(len(s.values) for m in batch for s in m.series)
        return pb.StreamMetricsResponse(accepted_points=accepted), AnsweredCall(self.forms)


class FakeStub:
    """A sidecar that says it reads `forms` (None: an older one, which says nothing)."""

    def __init__(self, forms: str | None = None) -> None:
        self.StreamMetrics = _StreamCall(forms)


def test_points_arrive_in_order_in_batches():
    stub = FakeStub()
    stream = MetricStream(stub, max_batch_points=3)  # type: ignore[arg-type]
    for step in range(7):
        stream.log("r1", "reward", step * 0.5, step=step, timestamp_ms=1000 + step)
        if step in (2, 5):
            stream.flush()
    assert stream.close() == 7
    messages = stub.StreamMetrics.messages
    assert [len(m.series) for m in messages] == [1, 1, 1]
    assert [len(m.series[0].values) for m in messages] == [3, 3, 1]
    sent = [p for m in messages for p in points_of(m)]
    assert [(p.run_id, p.key, p.value, p.timestamp_ms, p.step) for p in sent] == [
        ("r1", "reward", s * 0.5, 1000 + s, s) for s in range(7)
    ]


def test_a_closed_stream_refuses_points_and_closes_again_quietly():
    stub = FakeStub()
    stream = MetricStream(stub)  # type: ignore[arg-type]
    stream.log("r1", "loss", 1.0, step=1)
    assert stream.close() == 1
    with pytest.raises(FailedPreconditionError, match="closed"):
        stream.log("r1", "loss", 2.0, step=2)
    with pytest.raises(FailedPreconditionError, match="closed"):
        stream.flush()
    assert stream.close() == 1
    assert [len(s.values) for m in stub.StreamMetrics.messages for s in m.series] == [1]


def test_a_batch_holds_one_series_per_run_and_key():
    stub = FakeStub()
    stream = MetricStream(stub, max_batch_points=6)  # type: ignore[arg-type]
    for step in range(2):
        stream.log_metrics("r1", {"reward": 1.0 + step, "loss": 2.0 + step}, step=step)
        stream.log("r2", "reward", 3.0 + step, step=step, timestamp_ms=50)
    assert stream.close() == 6
    (message,) = stub.StreamMetrics.messages
    assert [(s.run_id, s.key, list(s.values), list(s.steps)) for s in message.series] == [
        ("r1", "reward", [1.0, 2.0], [0, 1]),
        ("r1", "loss", [2.0, 3.0], [0, 1]),
        ("r2", "reward", [3.0, 4.0], [0, 1]),
    ]
    assert list(message.series[2].timestamps_ms) == [50, 50]
    assert all(t > 0 for s in message.series for t in s.timestamps_ms)


def test_numbers_of_other_types_are_converted_as_protobuf_would():
    stub = FakeStub()
    stream = MetricStream(stub)  # type: ignore[arg-type]
    stream.log("r1", "loss", np.float32(1.5), step=np.int64(3))  # type: ignore[arg-type]
    stream.log("r1", "loss", 2, step=4, timestamp_ms=77)
    assert stream.close() == 2
    first, second = points_of(stub.StreamMetrics.messages[0])
    assert (first.value, first.step) == (1.5, 3)
    assert first.timestamp_ms > 0  # stamped at log time
    assert (second.value, second.step, second.timestamp_ms) == (2.0, 4, 77)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"value": "1.0"}, "value must be a number"),
        ({"value": None}, "value must be a number"),
        ({"step": 1.5}, "integer"),
        ({"timestamp_ms": "now"}, "integer"),
        ({"run_id": 5}, "run_id must be a str"),
        ({"key": b"loss"}, "key must be a str"),
        ({"run_id": ["r1"]}, "run_id must be a str"),
    ],
)
def test_wrong_types_are_refused_at_the_call(args, message):
    stub = FakeStub()
    stream = MetricStream(stub)  # type: ignore[arg-type]
    point = {"run_id": "r1", "key": "loss", "value": 1.0, "step": 1, "timestamp_ms": 0} | args
    with pytest.raises(TypeError, match=message):
        stream.log(point.pop("run_id"), point.pop("key"), point.pop("value"), **point)
    stream.log("r1", "loss", 1.0)  # the stream carries on
    assert stream.close() == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"timestamp_ms": -1}, "timestamp_ms must be in"),
        ({"timestamp_ms": 2**63}, "timestamp_ms must be in"),
        ({"step": 2**63}, "step must fit in 64 bits"),
        ({"step": -(2**63) - 1}, "step must fit in 64 bits"),
    ],
)
def test_numbers_out_of_range_are_refused_at_the_call(args, message):
    # Caught later, such a point would spoil the whole batch it was cut into.
    stub = FakeStub()
    stream = MetricStream(stub)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        stream.log("r1", "loss", 1.0, **({"step": 1, "timestamp_ms": 0} | args))
    stream.log("r1", "loss", 1.0)  # the stream carries on
    assert stream.close() == 1


class _StalledCall:
    """Takes one message, then waits until released: the sidecar is not reading."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.taken = threading.Event()
        self.first = 0
        self.points = 0

    def with_call(self, requests, timeout=None, **kwargs):
        accepted = 0  # by this call: the stream adds up its calls' answers
        for message in requests:
            if not self.taken.is_set():
                self.first = sum(len(s.values) for s in message.series)
                self.taken.set()
            self.release.wait()
            accepted += sum(len(s.values) for s in message.series)
        self.points += accepted
        return pb.StreamMetricsResponse(accepted_points=accepted), None


def test_log_blocks_while_the_buffer_is_full_and_loses_nothing():
    stub = FakeStub()
    stub.StreamMetrics = _StalledCall()  # type: ignore[assignment]
    stream = MetricStream(
        stub,  # type: ignore[arg-type]
        max_batch_points=10,
        max_buffered_points=30,
        max_delay_s=60,
    )
    logged: list[int] = []

    def trainer() -> None:
        for step in range(100):
            if step == 10:  # a batch is due: the sender takes it, then stalls
                assert stub.StreamMetrics.taken.wait(10)
            stream.log("r1", "loss", 1.0, step=step, timestamp_ms=5)
            logged.append(step)

    thread = threading.Thread(target=trainer)
    thread.start()
    # One message of ten in flight (held until accepted, so it counts); the call that
    # buffers twenty more waits.
    deadline = time.monotonic() + 10
    while len(logged) < 29 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread.join(0.3)
    assert thread.is_alive()
    assert stub.StreamMetrics.first == 10
    assert len(logged) == 29
    stub.StreamMetrics.release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert stream.close() == 100


@pytest.mark.parametrize(
    ("as_on_the_wire", "forms", "fixed"),
    [
        (True, "varint,fixed64", True),
        (True, "fixed64", True),
        (True, "varint", False),
        (True, None, False),  # an older sidecar says nothing: varints, which it reads
        (False, "varint,fixed64", False),  # a big-endian machine encodes varints itself
    ],
    ids=["fixed", "fixed-only", "varint", "older-sidecar", "big-endian"],
)
def test_points_reach_the_message_bit_for_bit_in_the_form_the_sidecar_reads(
    monkeypatch, as_on_the_wire, forms, fixed
):
    from mlflow_sidecar.client import metric_stream

    monkeypatch.setattr(metric_stream, "_NUMBERS_AS_ON_THE_WIRE", as_on_the_wire)
    values = [0.0, -0.0, 1.5, -2.25e-310, 1.7976931348623157e308, float("inf"), float("nan")]
    values += [i / 7 for i in range(300)]  # a length of more than one varint byte
    steps = [-(2**63), 2**63 - 1, -1, 0, *range(len(values) - 4)]
    stamps = [2**63 - 1] + [1_764_000_000_000 + i for i in range(len(values) - 1)]
    stub = FakeStub(forms)
    stream = MetricStream(stub)  # type: ignore[arg-type]
    # The first call tells the stream what the sidecar reads.
    stream.log("r0", "first", 1.0, step=0, timestamp_ms=1)
    stream.flush()
    for value, stamp, step in zip(values, stamps, steps, strict=True):
        stream.log("r1", "x", value, step=step, timestamp_ms=stamp)
    assert stream.close() == len(values) + 1
    (_, message) = stub.StreamMetrics.messages
    expected = pb.StreamMetricsRequest()
    columns = (
        {"fixed_timestamps_ms": stamps, "fixed_steps": steps}
        if fixed
        else {"timestamps_ms": stamps, "steps": steps}
    )
    expected.series.add(run_id="r1", key="x", values=values, **columns)
    assert message.SerializeToString() == expected.SerializeToString()


def test_the_first_call_carries_one_message_and_the_rest_go_in_the_form_the_sidecar_reads():
    stub = FakeStub("varint,fixed64")
    # A window long enough that only the rule ends the first call.
    stream = MetricStream(stub, max_batch_points=10, max_delay_s=0.01, call_window_s=600)  # type: ignore[arg-type]
    for step in range(5000):
        stream.log("r1", "loss", 1.0, step=step, timestamp_ms=1 + step)
        if step == 10:  # a batch is due: the first call ends after sending it, unflushed
            deadline = time.monotonic() + 10
            while not stub.StreamMetrics.calls and time.monotonic() < deadline:
                time.sleep(0.01)
    assert stream.close() == 5000
    first, *later = stub.StreamMetrics.calls
    assert len(first) == 1
    assert first[0].series[0].steps and not first[0].series[0].fixed_steps
    assert later
    assert all(s.fixed_steps and not s.steps for call in later for m in call for s in m.series)
    sent = [p.step for m in stub.StreamMetrics.messages for p in points_of(m)]
    assert sent == list(range(5000))
