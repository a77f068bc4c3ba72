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


def test_metric_columns_behave_as_a_sequence_of_points():
    from mlflow_sidecar.client.domain import MetricColumns, MetricPoint

    points = [MetricPoint(f"r{i % 2}", "k", float(i), 100 + i, i) for i in range(5)]
    columns = MetricColumns.from_points(points)
    assert len(columns) == 5
    assert list(columns) == points
    assert columns[3] == points[3]
    assert list(columns[1:3]) == points[1:3]
    assert list(columns.take([4, 0])) == [points[4], points[0]]
    assert MetricColumns.from_points(columns) is columns
    with pytest.raises(ValueError, match="same length"):
        MetricColumns(["r"], ["k"], [1.0, 2.0], [0], [0])


@pytest.mark.parametrize(
    ("column", "bad", "field"),
    [
        ("run_ids", "", "points[2].run_id"),
        ("keys", "bad\x00key", "points[2].key"),
        ("timestamps_ms", -1, "points[2].timestamp_ms"),
    ],
)
def test_the_first_bad_point_of_a_message_is_named(column, bad, field):
    from mlflow_sidecar.client.domain import MetricColumns
    from mlflow_sidecar.client.errors import InvalidArgumentError
    from mlflow_sidecar.server.services.metric_ingest import _check_points

    columns = MetricColumns(["r"] * 4, ["k"] * 4, [1.0] * 4, [5] * 4, [0] * 4)
    getattr(columns, column)[2] = bad
    getattr(columns, column)[3] = bad
    with pytest.raises(InvalidArgumentError) as err:
        _check_points(columns)
    assert err.value.field == field
