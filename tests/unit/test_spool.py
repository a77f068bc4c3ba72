"""The spool store and the deliverer, with a fake MLflow behind our `log_metrics` callable."""

from __future__ import annotations

import math
import shutil
import sqlite3
import threading
from array import array

import pytest

from mlflow_sidecar.core.domain import Metric, MetricPoint
from mlflow_sidecar.core.errors import (
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from mlflow_sidecar.server.metric_batch import MetricBatch
from mlflow_sidecar.server.spool.deliverer import MetricDeliverer
from mlflow_sidecar.server.spool.store import SpoolStore
from tests.fakes.mlflow_port import FakeMlflow


def point_list(run_id: str, n: int, start: int = 0) -> list[MetricPoint]:
    return [MetricPoint(run_id, "loss", float(i), 1_000 + i, i) for i in range(start, start + n)]


def points(run_id: str, n: int, start: int = 0) -> MetricBatch:
    """One message's points of a run, as the servicer hands them to the spool."""
    return MetricBatch.from_points(point_list(run_id, n, start))


def fake_mlflow(*run_ids: str) -> FakeMlflow:
    """An MLflow that knows these runs."""
    mlflow = FakeMlflow()
    for run_id in run_ids:
        mlflow.add_run(run_id)
    return mlflow


def delivered(mlflow: FakeMlflow, run_id: str) -> list[Metric]:
    return [
        m
        for call in mlflow.effects("log_metrics")
        if call["run_id"] == run_id
        for m in call["metrics"]
    ]


def batch_sizes(mlflow: FakeMlflow) -> list[int]:
    return [len(call["metrics"]) for call in mlflow.effects("log_metrics")]


def events(mlflow: FakeMlflow) -> list[tuple[object, ...]]:
    """The deliveries and ends that reached MLflow, in order."""
    return [
        ("batch", a["run_id"], len(a["metrics"]))
        if name == "log_metrics"
        else ("end", a["run_id"], a["status"], a["end_time_ms"])
        for name, a in mlflow.record
        if name in ("log_metrics", "end_run")
    ]


def fail_next(mlflow: FakeMlflow, *errors: Exception) -> None:
    """The next calls fail with these errors, one each, whatever they are."""
    for error in errors:
        mlflow.fail("*", error)


def first_batch(mlflow: FakeMlflow) -> threading.Event:
    """Set once a delivery reaches MLflow."""
    began = threading.Event()
    mlflow.on_call("log_metrics", began.set)
    return began


@pytest.fixture()
def store(tmp_path):
    s = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=100)
    yield s
    s.close()


def make_deliverer(
    store: SpoolStore, mlflow: FakeMlflow, batch_size: int = 100, workers: int = 4
) -> MetricDeliverer:
    return MetricDeliverer(
        store,
        mlflow.log_metrics,
        batch_size=batch_size,
        backoff_factor_s=0.01,
        max_backoff_s=0.02,
        workers=workers,
        end_run=mlflow.end_run,
    )


def test_append_is_durable_across_reopen(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=4)
    store.append(MetricBatch.from_points(point_list("a", 10) + point_list("b", 5)))
    store.close()
    reopened = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=4)
    assert reopened.pending() == 15
    assert reopened.pending("a") == 10 and reopened.pending("b") == 5
    batch = reopened.oldest("a", 4)
    assert batch is not None
    assert [m.step for m in batch.metrics] == [0, 1, 2, 3]
    reopened.delete(batch)
    assert reopened.pending("a") == 6
    reopened.close()


def test_a_full_spool_refuses_the_whole_message(store):
    store.append(points("a", 990))
    with pytest.raises(ResourceExhaustedError) as err:
        store.append(points("a", 20, start=990))
    assert err.value.reason == ErrorReason.SPOOL_FULL
    assert err.value.retry_after_s is not None and err.value.retry_after_s > 0
    assert store.pending() == 990
    assert store.append(points("a", 10, start=990)) == 10


def test_nan_survives_the_spool(store):
    nan_and_inf = [MetricPoint("a", "x", math.nan, 1, 0), MetricPoint("a", "x", math.inf, 2, 1)]
    store.append(MetricBatch.from_points(nan_and_inf))
    batch = store.oldest("a", 10)
    assert batch is not None
    assert math.isnan(batch.metrics[0].value) and batch.metrics[1].value == math.inf


def test_deliverer_drains_in_order_in_mlflow_sized_batches(store):
    mlflow = fake_mlflow("a", "b")
    store.append(MetricBatch.from_points(point_list("a", 250) + point_list("b", 30)))
    deliverer = make_deliverer(store, mlflow)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("", 10) == 0
    finally:
        deliverer.stop()
    assert [m.step for m in delivered(mlflow, "a")] == list(range(250))
    assert [m.step for m in delivered(mlflow, "b")] == list(range(30))
    assert max(batch_sizes(mlflow)) == 100
    assert store.pending() == 0


def test_transient_failures_lose_nothing(store):
    mlflow = fake_mlflow("a")
    fail_next(mlflow, *[UnavailableError("down")] * 5, RuntimeError("surprise"))
    store.append(points("a", 120))
    deliverer = make_deliverer(store, mlflow)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("a", 10) == 0
    finally:
        deliverer.stop()
    assert [m.step for m in delivered(mlflow, "a")] == list(range(120))
    assert store.dead_letter_count() == 0


@pytest.mark.parametrize("error", [NotFoundError("no run"), FailedPreconditionError("deleted")])
def test_a_run_that_refuses_writes_is_dead_lettered_whole(store, error):
    mlflow = fake_mlflow("gone")
    fail_next(mlflow, error)
    store.append(points("gone", 150))
    deliverer = make_deliverer(store, mlflow)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("gone", 10) == 0
    finally:
        deliverer.stop()
    assert delivered(mlflow, "gone") == []
    assert store.dead_letter_count("gone") == 150
    (group,) = store.status().dead_letters
    assert group.run_id == "gone" and group.points == 150
    assert error.code.name in group.reason


def test_an_invalid_batch_is_dead_lettered_alone(store):
    mlflow = fake_mlflow("a")
    fail_next(mlflow, InvalidArgumentError("", "bad point"))
    store.append(points("a", 150))
    deliverer = make_deliverer(store, mlflow)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("a", 10) == 0
    finally:
        deliverer.stop()
    assert store.dead_letter_count("a") == 100
    assert [m.step for m in delivered(mlflow, "a")] == list(range(100, 150))


def test_points_for_a_run_ended_through_the_sidecar_are_refused_at_acceptance(store):
    store.record_end("done", "FINISHED", 5_000, applied=True)
    with pytest.raises(FailedPreconditionError) as refused:
        store.append(points("done", 3))
    assert refused.value.reason == "RUN_ENDED"
    assert "FINISHED" in refused.value.message
    # Nothing was accepted, so nothing is dead-lettered: the caller was told instead.
    assert store.pending("done") == 0 and store.dead_letter_count("done") == 0


def test_wait_delivered_reports_what_is_left_at_the_timeout(store):
    mlflow = fake_mlflow("a")
    mlflow.fail("*", UnavailableError("down"), times=None)
    store.append(points("a", 10))
    deliverer = make_deliverer(store, mlflow)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("a", 0.3) == 10
    finally:
        deliverer.stop()
    status = store.status()
    assert status.pending_points == 10 and status.oldest_age_s >= 0


def test_batches_combine_whole_chunks_up_to_the_limit(store):
    for start in (0, 40, 80):
        store.append(points("a", 40, start=start))  # three messages: three chunks of 40
    batch = store.oldest("a", 100)
    assert batch is not None
    assert [m.step for m in batch.metrics] == list(range(80))  # two chunks; a third would be 120
    store.delete(batch)
    assert store.pending("a") == 40
    rest = store.oldest("a", 100)
    assert rest is not None and [m.step for m in rest.metrics] == list(range(80, 120))


def test_one_message_for_many_runs_keeps_each_runs_order(store):
    mixed = [MetricPoint(f"run{i % 3}", "k", float(i), 1_000 + i, i) for i in range(300)]
    store.append(MetricBatch.from_points(mixed))
    for run in range(3):
        batch = store.oldest(f"run{run}", 1000)
        assert batch is not None
        assert [m.step for m in batch.metrics] == list(range(run, 300, 3))


class Trickle:
    """Accepts a point into the spool every few milliseconds until stopped, as a stream does."""

    def __init__(self, store: SpoolStore, deliverer: MetricDeliverer) -> None:
        self.store, self.deliverer = store, deliverer
        self.sent = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(0.005):
            self.store.append(points("a", 1, start=self.sent))
            self.deliverer.notify()
            self.sent += 1

    def __enter__(self) -> Trickle:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


def test_points_are_delivered_while_a_burst_lasts(store):
    mlflow = fake_mlflow("a")
    began = first_batch(mlflow)
    deliverer = MetricDeliverer(
        store, mlflow.log_metrics, batch_size=100, backoff_factor_s=0.01, max_backoff_s=0.02
    )
    deliverer.start()
    try:
        # Points never pause: delivery does not wait for them to.
        with Trickle(store, deliverer) as trickle:
            assert began.wait(10)
        assert deliverer.wait_delivered("a", 10) == 0
        assert [m.step for m in delivered(mlflow, "a")] == list(range(trickle.sent))
    finally:
        deliverer.stop()


def test_a_chunk_of_one_key_stores_it_once_and_reads_back_every_point(store):
    store.append(
        MetricBatch.from_points([*point_list("a", 50), MetricPoint("a", "reward", 1.0, 1, 0)])
    )
    batch = store.oldest("a", 100)
    assert batch is not None
    assert [m.key for m in batch.metrics] == ["loss"] * 50 + ["reward"]
    rows = sqlite3.connect(store.path).execute("SELECT count, keys FROM chunks").fetchall()
    assert rows == [(51, "\n".join(["loss"] * 50 + ["reward"]))]
    store.delete(batch)
    store.append(points("a", 50))
    rows = sqlite3.connect(store.path).execute("SELECT count, keys FROM chunks").fetchall()
    assert rows == [(50, "loss")]
    again = store.oldest("a", 100)
    assert again is not None
    assert [(m.key, m.step) for m in again.metrics] == [("loss", i) for i in range(50)]


def test_a_chunk_spooled_with_one_key_per_point_is_still_read(tmp_path):
    # How a chunk of one key was stored before it was stored once: the key per point.
    path = tmp_path / "spool.db"
    SpoolStore(path, max_points=1000).close()
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO chunks (run_id, count, keys, vals, timestamps, steps, accepted_ms)"
            " VALUES ('a', 3, 'loss\nloss\nloss', ?, ?, ?, 1)",
            (
                array("d", [0.5, 1.5, 2.5]).tobytes(),
                array("q", [7, 8, 9]).tobytes(),
                array("q", [0, 1, 2]).tobytes(),
            ),
        )
    store = SpoolStore(path, max_points=1000)
    try:
        batch = store.oldest("a", 100)
        assert batch is not None
        assert list(batch.metrics) == [
            Metric("loss", 0.5, 7, 0),
            Metric("loss", 1.5, 8, 1),
            Metric("loss", 2.5, 9, 2),
        ]
    finally:
        store.close()


def test_a_new_spool_has_large_pages_and_an_older_one_keeps_its_own(tmp_path):
    new = SpoolStore(tmp_path / "new.db", max_points=1000)
    new.close()
    assert sqlite3.connect(tmp_path / "new.db").execute("PRAGMA page_size").fetchone() == (
        64 * 1024,
    )
    # A spool created with SQLite's default pages opens, takes and gives back points.
    sqlite3.connect(tmp_path / "old.db").execute("CREATE TABLE marker (x)").connection.close()
    old = SpoolStore(tmp_path / "old.db", max_points=1000)
    try:
        old.append(points("a", 5))
        batch = old.oldest("a", 10)
        assert batch is not None and [m.step for m in batch.metrics] == list(range(5))
    finally:
        old.close()
    assert sqlite3.connect(tmp_path / "old.db").execute("PRAGMA page_size").fetchone() == (4096,)


# -- ends recorded while points wait ----------------------------------------------------


def test_a_recorded_end_reaches_mlflow_after_the_runs_last_point(store):
    mlflow = fake_mlflow("r")
    store.append(points("r", 250))
    assert store.record_end("r", "FAILED", 7_000, applied=False) == 250
    with pytest.raises(FailedPreconditionError):  # after the end: refused
        store.append(points("r", 5, start=250))
    deliverer = make_deliverer(store, mlflow)
    assert deliverer.ends_left() == 1
    deliverer.start()
    try:
        assert deliverer.wait_delivered("r", 10) == 0
    finally:
        deliverer.stop()
    assert deliverer.ends_left() == 0
    assert [e[0] for e in events(mlflow)] == ["batch", "batch", "batch", "end"]
    assert events(mlflow)[-1] == ("end", "r", "FAILED", 7_000)
    assert len(delivered(mlflow, "r")) == 250
    assert store.dead_letter_count("r") == 0
    end = store.run_end("r")
    assert end is not None and end.applied


def test_a_recorded_end_survives_a_restart(tmp_path):
    path = tmp_path / "spool.db"
    first = SpoolStore(path, max_points=1000, chunk_points=100)
    first.append(points("r", 30))
    first.record_end("r", "FINISHED", 9_000, applied=False)
    first.close()
    store = SpoolStore(path, max_points=1000, chunk_points=100)
    mlflow = fake_mlflow("r")
    deliverer = make_deliverer(store, mlflow)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("r", 10) == 0
    finally:
        deliverer.stop()
        store.close()
    assert events(mlflow) == [("batch", "r", 30), ("end", "r", "FINISHED", 9_000)]


def test_an_end_applied_as_read_before_another_was_recorded_leaves_the_newer_to_apply(
    store, tmp_path
):
    # The deliverer applied the end it read; an EndRun recorded another meanwhile, which
    # is not in MLflow yet and must stay to be applied (also across a restart).
    store.record_end("r", "FINISHED", 5_000, applied=False)
    read = store.run_end("r")
    assert read is not None
    store.record_end("r", "FAILED", 6_000, applied=False)
    store.end_applied("r", read)
    assert [(e.status, e.applied) for e in store.ends_to_apply()] == [("FAILED", False)]
    store.close()
    reopened = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=100)
    try:
        assert [e.status for e in reopened.ends_to_apply()] == ["FAILED"]
        current = reopened.run_end("r")
        assert current is not None
        reopened.end_applied("r", current)
        assert reopened.ends_to_apply() == []
    finally:
        reopened.close()


def test_an_end_mlflow_refuses_for_now_is_tried_again(store):
    mlflow = fake_mlflow("r")
    store.append(points("r", 3))
    store.record_end("r", "FINISHED", 1, applied=False)
    deliverer = make_deliverer(store, mlflow)
    fail_next(mlflow, UnavailableError("down"))  # the batch fails first, then goes through
    deliverer.start()
    try:
        assert deliverer.wait_delivered("r", 10) == 0
    finally:
        deliverer.stop()
    assert events(mlflow)[-1] == ("end", "r", "FINISHED", 1)


def test_a_spool_from_before_recorded_ends_gains_their_columns(tmp_path):
    path = tmp_path / "spool.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE ended_runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " ended_ms INTEGER NOT NULL)"
    )
    db.execute("INSERT INTO ended_runs VALUES ('old', 'FINISHED', 1)")
    db.commit()
    db.close()
    store = SpoolStore(path, max_points=1000, chunk_points=100)
    try:
        end = store.run_end("old")
        # Ended before: applied, and every point that arrives later is refused.
        assert end is not None and end.applied and end.last_chunk == 0
        assert store.ends_to_apply() == []
    finally:
        store.close()


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_spool_removed_or_replaced_behind_the_sidecar_takes_no_more_points(tmp_path, how):
    # Its data dir deleted (and, say, made again by something else): a point written to
    # the open file now would be in a file no restart finds. What it held is delivered.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = SpoolStore(data_dir / "spool.db", max_points=1000, chunk_points=100)
    try:
        assert store.append(points("a", 10)) == 10
        shutil.rmtree(data_dir)
        if how == "replaced":
            data_dir.mkdir()
            SpoolStore(data_dir / "spool.db", max_points=1000).close()
        with pytest.raises(FailedPreconditionError) as refused:
            store.append(points("a", 5, start=10))
        assert "data dir was removed or replaced" in refused.value.message
        assert store.pending() == 10
    finally:
        store.close()
