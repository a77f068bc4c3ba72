"""StreamMetrics messages of series only: read as numpy columns, checked, spooled."""

from __future__ import annotations

import math
import sqlite3
import time

import pytest

from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import MetricColumns, MetricPoint
from mlflow_sidecar.core.errors import InvalidArgumentError, ResourceExhaustedError
from mlflow_sidecar.server.metric_series import SeriesBatch, stream_message_points
from mlflow_sidecar.server.services.metric_ingest import _checked_series
from mlflow_sidecar.server.spool.store import SpoolStore
from mlflow_sidecar.v1 import tracking_pb2 as pb


def _series_only() -> pb.StreamMetricsRequest:
    return pb.StreamMetricsRequest(
        series=[
            pb.MetricSeries(run_id="r0", key="a", values=[1.0], timestamps_ms=[7], steps=[1]),
            pb.MetricSeries(run_id="r1", key="b"),  # empty: no points
            pb.MetricSeries(
                run_id="r1", key="c", values=[2.0, 3.0], timestamps_ms=[8, 9], steps=[2, 3]
            ),
            pb.MetricSeries(run_id="r2", key="d", values=[4.0], timestamps_ms=[10], steps=[4]),
            pb.MetricSeries(run_id="r1", key="e", values=[5.0], timestamps_ms=[11], steps=[5]),
        ]
    )


EXPECTED = [
    MetricPoint("r0", "a", 1.0, 7, 1),
    MetricPoint("r1", "c", 2.0, 8, 2),
    MetricPoint("r1", "c", 3.0, 9, 3),
    MetricPoint("r2", "d", 4.0, 10, 4),
    MetricPoint("r1", "e", 5.0, 11, 5),
]


def test_a_message_of_series_only_is_read_as_numpy_columns_and_reads_back_as_points():
    batch = stream_message_points(_series_only())
    assert isinstance(batch, SeriesBatch)
    assert len(batch) == 5
    assert list(batch) == EXPECTED
    assert [batch[i] for i in range(5)] == EXPECTED
    assert batch[-1] == EXPECTED[-1]
    assert list(batch[1:4]) == EXPECTED[1:4]
    assert [s.index for s in batch.series] == [0, 2, 3, 4]  # the empty one is dropped
    with pytest.raises(IndexError):
        batch[5]


def test_a_message_with_points_sent_one_by_one_is_read_the_general_way():
    message = _series_only()
    message.points.add(run_id="r9", key="z", value=9.0, timestamp_ms=1, step=0)
    points = stream_message_points(message)
    assert isinstance(points, MetricColumns)
    assert list(points) == [MetricPoint("r9", "z", 9.0, 1, 0), *EXPECTED]


def test_a_series_with_columns_of_different_lengths_is_refused():
    message = _series_only()
    del message.series[2].steps[1]
    with pytest.raises(InvalidArgumentError) as err:
        stream_message_points(message)
    assert err.value.field == "series[2]"
    assert "got 2, 2 and 1" in err.value.message


@pytest.mark.parametrize(
    ("spoil", "field", "problem"),
    [
        (lambda m: setattr(m.series[2], "run_id", ""), "series[2].run_id", "must not be empty"),
        (lambda m: setattr(m.series[3], "key", "bad\x00key"), "series[3].key", "NUL"),
        (
            lambda m: m.series[2].timestamps_ms.__setitem__(1, -5),
            "series[2].timestamps_ms[1]",
            "must not be negative",
        ),
    ],
)
def test_a_bad_series_is_named_as_its_request_sent_it(spoil, field, problem):
    message = _series_only()
    spoil(message)
    batch = stream_message_points(message)
    assert isinstance(batch, SeriesBatch)
    with pytest.raises(InvalidArgumentError) as err:
        _checked_series(batch)
    assert err.value.field == field
    assert problem in err.value.message
    # Named once, as the request sent it: not "series[2].run_id: run_id: ...".
    assert err.value.message.count(": ") == 1


def test_zero_timestamps_are_stamped_with_the_time_of_acceptance_and_others_kept():
    message = _series_only()
    message.series[2].timestamps_ms[0] = 0
    before = time.time_ns() // 1_000_000
    batch = stream_message_points(message)
    assert isinstance(batch, SeriesBatch)
    checked = _checked_series(batch)
    after = time.time_ns() // 1_000_000
    stamps = [p.timestamp_ms for p in checked]
    assert before <= stamps[1] <= after
    assert stamps[:1] + stamps[2:] == [7, 9, 10, 11]


def _all_spooled(store: SpoolStore, run_id: str) -> list[tuple[str, float, int, int]]:
    batch = store.oldest(run_id, 10_000)
    assert batch is not None
    return [(m.key, m.value, m.timestamp_ms, m.step) for m in batch.metrics]


def test_series_spool_exactly_as_the_same_points_sent_one_by_one(tmp_path):
    message = _series_only()
    many = message.series.add(run_id="r1", key="c")
    many.values.extend([float(i) for i in range(7)] + [math.nan])
    many.timestamps_ms.extend(range(100, 108))
    many.steps.extend(range(10, 18))
    as_series = SpoolStore(tmp_path / "series.db", max_points=100, chunk_points=3)
    as_points = SpoolStore(tmp_path / "points.db", max_points=100, chunk_points=3)
    assert as_series.append(stream_message_points(message)) == 13
    assert as_points.append(list(conv.metric_columns_from_pb(message))) == 13
    for run_id in ("r0", "r1", "r2"):
        assert as_series.pending(run_id) == as_points.pending(run_id)
        got, want = _all_spooled(as_series, run_id), _all_spooled(as_points, run_id)
        assert [g[:1] + g[2:] for g in got] == [w[:1] + w[2:] for w in want]
        assert [str(g[1]) for g in got] == [str(w[1]) for w in want]  # NaN included
    rows = sqlite3.connect(as_series.path).execute(
        "SELECT count, keys FROM chunks WHERE run_id = 'r1' ORDER BY id"
    )
    # r1's points in message order, three to a chunk; a chunk of one key stores it once.
    assert rows.fetchall() == [(3, "c\nc\ne"), (3, "c"), (3, "c"), (2, "c")]
    as_series.close()
    as_points.close()


def test_a_full_spool_refuses_a_message_of_series_whole(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=4, chunk_points=100)
    with pytest.raises(ResourceExhaustedError, match="5 points of this message"):
        store.append(stream_message_points(_series_only()))
    assert store.pending() == 0
    store.close()
