"""`MetricStream.log` keeps points as tuples and builds messages a batch at a time: the
types protobuf would refuse are still refused at the call that logs them."""

from __future__ import annotations

import numpy as np
import pytest

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.v1 import tracking_pb2 as pb


class _StreamCall:
    def __init__(self) -> None:
        self.messages: list[pb.StreamMetricsRequest] = []

    def with_call(self, requests, timeout=None, **kwargs):
        batch = list(requests)
        self.messages.extend(batch)
        return pb.StreamMetricsResponse(accepted_points=sum(len(m.points) for m in batch)), None


class FakeStub:
    def __init__(self) -> None:
        self.StreamMetrics = _StreamCall()


def test_points_arrive_in_order_in_batches():
    stub = FakeStub()
    stream = MetricStream(stub, max_batch_points=3)  # type: ignore[arg-type]
    for step in range(7):
        stream.log("r1", "reward", step * 0.5, step=step, timestamp_ms=1000 + step)
    assert stream.close() == 7
    messages = stub.StreamMetrics.messages
    assert [len(m.points) for m in messages] == [3, 3, 1]
    sent = [p for m in messages for p in m.points]
    assert [(p.run_id, p.key, p.value, p.timestamp_ms, p.step) for p in sent] == [
        ("r1", "reward", s * 0.5, 1000 + s, s) for s in range(7)
    ]


def test_numbers_of_other_types_are_converted_as_protobuf_would():
    stub = FakeStub()
    stream = MetricStream(stub)  # type: ignore[arg-type]
    stream.log("r1", "loss", np.float32(1.5), step=np.int64(3))  # type: ignore[arg-type]
    stream.log("r1", "loss", 2, step=4, timestamp_ms=77)
    assert stream.close() == 2
    first, second = stub.StreamMetrics.messages[0].points
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
