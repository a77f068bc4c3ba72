"""`MetricBatch`: a StreamMetrics message read as numpy columns, checked once, spooled run
by run, every bad point named as its request sent it."""

from __future__ import annotations

import math
import sqlite3
import time

import pytest

from mlflow_sidecar.core.domain import MetricPoint
from mlflow_sidecar.core.errors import ErrorReason, InvalidArgumentError, ResourceExhaustedError
from mlflow_sidecar.server.metric_batch import MetricBatch
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


def _with_points() -> pb.StreamMetricsRequest:
    message = _series_only()
    for step in range(3):
        message.points.add(run_id="r9", key="z", value=9.0, timestamp_ms=1, step=step)
    message.points.add(run_id="r9", key="y", value=8.0, timestamp_ms=2, step=3)
    return message


def _batch(message: pb.StreamMetricsRequest) -> MetricBatch:
    return MetricBatch.from_request(message.points, message.series)


def _points(batch: MetricBatch) -> list[MetricPoint]:
    return [
        MetricPoint(
            segment.run_id,
            segment.key,
            float(batch.values[i]),
            int(batch.timestamps_ms[i]),
            int(batch.steps[i]),
        )
        for segment in batch.segments
        for i in range(segment.start, segment.stop)
    ]


EXPECTED = [
    MetricPoint("r0", "a", 1.0, 7, 1),
    MetricPoint("r1", "c", 2.0, 8, 2),
    MetricPoint("r1", "c", 3.0, 9, 3),
    MetricPoint("r2", "d", 4.0, 10, 4),
    MetricPoint("r1", "e", 5.0, 11, 5),
]


def test_a_message_of_series_is_read_as_columns_with_one_segment_per_series():
    batch = _batch(_series_only())
    assert len(batch) == 5
    assert _points(batch) == EXPECTED
    assert [s.series for s in batch.segments] == [0, 2, 3, 4]  # the empty one has none


def test_points_sent_one_by_one_come_first_and_share_a_segment_per_run_and_key():
    batch = _batch(_with_points())
    assert _points(batch) == [
        *(MetricPoint("r9", "z", 9.0, 1, step) for step in range(3)),
        MetricPoint("r9", "y", 8.0, 2, 3),
        *EXPECTED,
    ]
    assert [(s.start, s.stop, s.first) for s in batch.segments[:2]] == [(0, 3, 0), (3, 4, 3)]


def test_a_batch_of_domain_points_reads_back_as_those_points():
    points = [MetricPoint(f"r{i % 2}", "k", float(i), 100 + i, i) for i in range(5)]
    assert _points(MetricBatch.from_points(points)) == points
    assert len(MetricBatch.from_points([])) == 0


@pytest.mark.parametrize(
    ("index", "field", "name"),
    [
        (0, "key", "points[0].key"),
        (2, "value", "points[2].value"),
        (3, "run_id", "points[3].run_id"),
        (4, "run_id", "series[0].run_id"),
        (6, "timestamp_ms", "series[2].timestamps_ms[1]"),
        (7, "key", "series[3].key"),
        (7, "step", "series[3].steps[0]"),
        (8, "value", "series[4].values[0]"),
    ],
)
def test_a_point_is_named_as_its_request_sent_it(index, field, name):
    assert _batch(_with_points()).field_path(index, field) == name


def test_a_series_with_columns_of_different_lengths_is_refused():
    message = _series_only()
    del message.series[2].steps[1]
    with pytest.raises(InvalidArgumentError) as err:
        _batch(message)
    assert err.value.field == "series[2]"
    assert "got 2, 2 and 1" in err.value.message


def _in_fixed_columns(message: pb.StreamMetricsRequest, *, stamps: bool, steps: bool) -> None:
    """Move the series' timestamps and/or steps into their fixed-width fields."""
    for series in message.series:
        if stamps:
            series.fixed_timestamps_ms.extend(series.timestamps_ms)
            series.ClearField("timestamps_ms")
        if steps:
            series.fixed_steps.extend(series.steps)
            series.ClearField("steps")


@pytest.mark.parametrize(("stamps", "steps"), [(True, True), (True, False), (False, True)])
def test_fixed_width_columns_read_as_the_same_points_as_varints(stamps, steps):
    message = _with_points()
    _in_fixed_columns(message, stamps=stamps, steps=steps)
    batch = _batch(message)
    assert _points(batch) == _points(_batch(_with_points()))
    assert _points(batch)[4:] == EXPECTED


def test_fixed_width_columns_keep_the_whole_int64_range():
    series = pb.MetricSeries(
        run_id="r",
        key="k",
        values=[1.0, 2.0],
        fixed_timestamps_ms=[2**63 - 1, 1],
        fixed_steps=[-(2**63), 2**63 - 1],
    )
    batch = MetricBatch.from_request((), [series])
    assert batch.timestamps_ms.tolist() == [2**63 - 1, 1]
    assert batch.steps.tolist() == [-(2**63), 2**63 - 1]


@pytest.mark.parametrize("column", ["timestamps_ms", "steps"])
def test_a_column_sent_in_both_forms_is_refused(column):
    message = _series_only()
    getattr(message.series[2], f"fixed_{column}").extend(getattr(message.series[2], column))
    with pytest.raises(InvalidArgumentError) as err:
        _batch(message)
    assert err.value.field == "series[2]"
    assert f"send {column} or fixed_{column}, not both" in err.value.message


def test_fixed_width_columns_of_a_different_length_are_refused_by_their_names():
    message = _series_only()
    _in_fixed_columns(message, stamps=True, steps=True)
    del message.series[2].fixed_steps[1]
    with pytest.raises(InvalidArgumentError) as err:
        _batch(message)
    assert err.value.field == "series[2]"
    assert "values, fixed_timestamps_ms and fixed_steps must have the same length" in str(
        err.value.message
    )
    assert "got 2, 2 and 1" in err.value.message


def test_a_bad_point_of_fixed_width_columns_is_named_by_its_field():
    message = _with_points()
    _in_fixed_columns(message, stamps=True, steps=True)
    message.series[2].fixed_timestamps_ms[1] = -5
    with pytest.raises(InvalidArgumentError) as err:
        _batch(message).checked()
    assert err.value.field == "series[2].fixed_timestamps_ms[1]"
    assert _batch(message).field_path(7, "step") == "series[3].fixed_steps[0]"


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
        (lambda m: setattr(m.points[3], "run_id", ""), "points[3].run_id", "must not be empty"),
        (lambda m: setattr(m.points[2], "key", "bad\x00key"), "points[2].key", "NUL"),
        (
            lambda m: setattr(m.points[1], "timestamp_ms", -1),
            "points[1].timestamp_ms",
            "must not be negative",
        ),
    ],
)
def test_the_first_bad_point_is_named_as_its_request_sent_it(spoil, field, problem):
    message = _with_points()
    spoil(message)
    with pytest.raises(InvalidArgumentError) as err:
        _batch(message).checked()
    assert err.value.field == field
    assert problem in err.value.message
    # Named once, as the request sent it: not "series[2].run_id: run_id: ...".
    assert err.value.message.count(": ") == 1


def test_a_bad_key_shared_by_later_points_is_named_at_its_first_point():
    message = _series_only()
    message.series[3].key = message.series[4].key = "bad\x00key"
    with pytest.raises(InvalidArgumentError) as err:
        _batch(message).checked()
    assert err.value.field == "series[3].key"


def test_zero_timestamps_are_stamped_with_the_time_of_acceptance_and_others_kept():
    message = _series_only()
    message.series[2].timestamps_ms[0] = 0
    before = time.time_ns() // 1_000_000
    checked = _batch(message).checked()
    after = time.time_ns() // 1_000_000
    stamps = checked.timestamps_ms.tolist()
    assert before <= stamps[1] <= after
    assert stamps[:1] + stamps[2:] == [7, 9, 10, 11]


def test_a_batch_of_one_run_goes_to_the_spool_as_its_columns_are():
    message = pb.StreamMetricsRequest(
        series=[
            pb.MetricSeries(run_id="r", key="a", values=[1.0], timestamps_ms=[1], steps=[1]),
            pb.MetricSeries(run_id="r", key="a", values=[2.0], timestamps_ms=[2], steps=[2]),
        ]
    )
    batch = _batch(message)
    (run,) = batch.by_run()
    assert run.values is batch.values and run.steps is batch.steps
    assert run.keys == "a"


def test_a_batch_of_many_runs_goes_to_the_spool_run_by_run_in_order():
    runs = {run.run_id: run for run in _batch(_series_only()).by_run()}
    assert list(runs) == ["r0", "r1", "r2"]
    assert runs["r1"].keys == ["c", "c", "e"]
    assert runs["r1"].steps.tolist() == [2, 3, 5]


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
    assert as_series.append(_batch(message)) == 13
    one_by_one = pb.StreamMetricsRequest()
    for point in _points(_batch(message)):
        one_by_one.points.add(
            run_id=point.run_id,
            key=point.key,
            value=point.value,
            timestamp_ms=point.timestamp_ms,
            step=point.step,
        )
    assert as_points.append(_batch(one_by_one)) == 13
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
    store = SpoolStore(tmp_path / "spool.db", max_points=6, chunk_points=100)
    first = pb.StreamMetricsRequest(
        series=[
            pb.MetricSeries(
                run_id="r0", key="a", values=[0.0, 1.0], timestamps_ms=[7, 7], steps=[0, 1]
            )
        ]
    )
    assert store.append(_batch(first)) == 2
    with pytest.raises(ResourceExhaustedError, match="5 points of this message") as err:
        store.append(_batch(_series_only()))
    assert err.value.reason == ErrorReason.SPOOL_FULL and err.value.retry_after_s
    assert store.pending() == 2
    store.close()


def test_a_message_larger_than_the_spool_is_refused_for_good(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=4, chunk_points=100)
    with pytest.raises(ResourceExhaustedError) as err:
        store.append(_batch(_series_only()))
    assert err.value.reason == ErrorReason.TOO_MANY_POINTS
    assert err.value.retry_after_s is None  # waiting never makes room for it
    assert err.value.metadata == {"points": "5", "max_points": "4"}
    assert "spool.max_points=4" in err.value.message
    assert store.pending() == 0
    store.close()
