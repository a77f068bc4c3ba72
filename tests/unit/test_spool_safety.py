"""The spool's schema versions, full disks, ended runs and dead-letter requeue/export, on a
real SQLite file; a deliverer whose deletes fail as a full disk makes them fail."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.domain import Metric, MetricPoint
from mlflow_sidecar.core.errors import (
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
)
from mlflow_sidecar.server.disk_full import disk_full_error
from mlflow_sidecar.server.metric_batch import MetricBatch
from mlflow_sidecar.server.services.metric_ingest import MetricIngest
from mlflow_sidecar.server.spool import store as spool_store
from mlflow_sidecar.server.spool.deliverer import MetricDeliverer
from mlflow_sidecar.server.spool.store import (
    SCHEMA_VERSION,
    SpooledBatch,
    SpoolStore,
    SpoolVersionError,
)

# The spool as the release before schema versions wrote it: every table, ended_runs with
# its later columns added at open, and user_version left at 0.
_UNVERSIONED = """
CREATE TABLE chunks (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, count INTEGER NOT NULL,
    keys TEXT NOT NULL, vals BLOB NOT NULL, timestamps BLOB NOT NULL, steps BLOB NOT NULL,
    accepted_ms INTEGER NOT NULL);
CREATE INDEX chunks_by_run ON chunks (run_id, id);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL,
    count INTEGER NOT NULL, keys TEXT NOT NULL, vals BLOB NOT NULL, timestamps BLOB NOT NULL,
    steps BLOB NOT NULL, accepted_ms INTEGER NOT NULL, reason TEXT NOT NULL,
    dead_ms INTEGER NOT NULL);
CREATE INDEX dead_letters_by_run ON dead_letters (run_id);
CREATE TABLE ended_runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL,
    ended_ms INTEGER NOT NULL, last_chunk INTEGER NOT NULL DEFAULT 0,
    end_time_ms INTEGER NOT NULL DEFAULT 0, applied INTEGER NOT NULL DEFAULT 1);
"""


def points(run_id: str, n: int, start: int = 0) -> list[MetricPoint]:
    return [MetricPoint(run_id, "loss", float(i), 1_000 + i, i) for i in range(start, start + n)]


def version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_a_new_spool_has_the_current_schema_version(tmp_path):
    SpoolStore(tmp_path / "spool.db", max_points=10).close()
    assert version(tmp_path / "spool.db") == SCHEMA_VERSION


def test_an_unversioned_spool_is_upgraded_and_keeps_its_points(tmp_path):
    path = tmp_path / "spool.db"
    older = SpoolStore(path, max_points=1000)
    older.append(MetricBatch.from_points(points("a", 7)))
    older.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=0")  # as the release before versions left it
    db.commit()
    db.close()
    store = SpoolStore(path, max_points=1000)
    try:
        assert store.pending("a") == 7
        batch = store.oldest("a", 100)
        assert batch is not None and [m.step for m in batch.metrics] == list(range(7))
    finally:
        store.close()
    assert version(path) == SCHEMA_VERSION


def test_a_spool_in_the_unversioned_format_opens_with_its_ends(tmp_path):
    path = tmp_path / "spool.db"
    db = sqlite3.connect(path)
    db.executescript(_UNVERSIONED)
    db.execute("INSERT INTO ended_runs VALUES ('r', 'KILLED', 1, 4, 99, 0)")
    db.commit()
    db.close()
    store = SpoolStore(path, max_points=1000)
    try:
        end = store.run_end("r")
        assert end is not None and (end.status, end.last_chunk, end.end_time_ms) == (
            "KILLED",
            4,
            99,
        )
        assert not end.applied
    finally:
        store.close()
    assert version(path) == SCHEMA_VERSION


def test_a_spool_newer_than_the_code_is_refused_in_one_line_and_left_alone(tmp_path):
    path = tmp_path / "spool.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(SpoolVersionError) as refused:
        SpoolStore(path, max_points=10)
    message = str(refused.value)
    assert "\n" not in message and f"schema version {SCHEMA_VERSION + 1}" in message
    assert version(path) == SCHEMA_VERSION + 1
    db = sqlite3.connect(path)
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == []
    db.close()


def test_a_full_spool_says_spool_full_with_a_retry_hint(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=5)
    try:
        store.append(MetricBatch.from_points(points("a", 3)))
        with pytest.raises(ResourceExhaustedError) as refused:
            store.append(MetricBatch.from_points(points("a", 3)))
    finally:
        store.close()
    assert refused.value.reason == "SPOOL_FULL" and refused.value.retry_after_s


def test_a_full_disk_is_resource_exhausted_disk_full_and_accepts_nothing(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=10_000_000, chunk_points=1000)
    try:
        store.append(MetricBatch.from_points(points("a", 10)))
        # SQLite's own limit on the file's pages: it fails writes with SQLITE_FULL, as
        # a full disk does.
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(ResourceExhaustedError) as refused:
            store.append(MetricBatch.from_points(points("a", 100_000, start=10)))
        assert refused.value.reason == "DISK_FULL" and refused.value.retry_after_s
        assert store.pending("a") == 10
        store._db.execute("PRAGMA max_page_count=1073741823")  # space is back
        assert store.append(MetricBatch.from_points(points("a", 5, start=10))) == 5
        batch = store.oldest("a", 1000)
        assert batch is not None and [m.step for m in batch.metrics] == list(range(15))
    finally:
        store.close()


class DiskFullOnDelete(SpoolStore):
    """Deletes fail as on a full disk until `room` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, max_points=1000, chunk_points=100)
        self.room = threading.Event()
        self.failed_deletes = 0

    def delete(self, batch: SpooledBatch) -> None:
        if not self.room.is_set():
            self.failed_deletes += 1
            if self.failed_deletes >= 3:
                self.room.set()
            raise disk_full_error("a delivered batch could not be deleted")
        super().delete(batch)


def test_a_batch_that_could_not_be_deleted_is_not_sent_again(tmp_path):
    store = DiskFullOnDelete(tmp_path / "spool.db")
    sent: list[tuple[str, int]] = []

    def log_batch(run_id: str, metrics: Sequence[Metric]) -> None:
        sent.append((run_id, metrics[0].step))

    store.append(MetricBatch.from_points(points("a", 250)))
    deliverer = MetricDeliverer(
        store, log_batch, batch_size=100, backoff_factor_s=0.01, max_backoff_s=0.02
    )
    deliverer.start()
    try:
        assert deliverer.wait_delivered("a", 30) == 0
    finally:
        deliverer.stop()
        store.close()
    assert store.failed_deletes == 3
    assert sent == [("a", 0), ("a", 100), ("a", 200)]


def test_dead_letters_are_exported_and_requeued_in_order(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=100)
    try:
        store.append(MetricBatch.from_points(points("a", 3)))
        store.append(MetricBatch.from_points(points("b", 2)))
        store.dead_letter("a", "NOT_FOUND: gone")
        store.dead_letter("b", "NOT_FOUND: gone too")
        letters = store.dead_letters()
        assert [(d.run_id, d.metric.step, d.reason) for d in letters] == [
            ("a", 0, "NOT_FOUND: gone"),
            ("a", 1, "NOT_FOUND: gone"),
            ("a", 2, "NOT_FOUND: gone"),
            ("b", 0, "NOT_FOUND: gone too"),
            ("b", 1, "NOT_FOUND: gone too"),
        ]
        assert letters[0].metric == Metric("loss", 0.0, 1_000, 0)
        assert store.requeue("a").points == 3
        assert store.pending("a") == 3 and store.dead_letter_count("a") == 0
        assert store.dead_letter_count("b") == 2
        batch = store.oldest("a", 100)
        assert batch is not None and [m.step for m in batch.metrics] == [0, 1, 2]
        assert store.requeue().points == 2
        assert store.dead_letter_count() == 0 and store.pending() == 5
    finally:
        store.close()


def test_requeued_points_go_before_newer_pending_ones_and_count_as_the_oldest(
    tmp_path, monkeypatch
):
    store = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=100)
    hour_ago = now_ms() - 3_600_000
    try:
        monkeypatch.setattr(spool_store, "now_ms", lambda: hour_ago)
        store.append(MetricBatch.from_points(points("a", 2)))
        store.dead_letter("a", "NOT_FOUND: gone")
        monkeypatch.undo()
        store.append(MetricBatch.from_points(points("a", 2, start=2)))
        store.append(MetricBatch.from_points(points("b", 1)))
        assert store.requeue().points == 2
        # The hour-old points are pending again: the spool's oldest is an hour old.
        assert store.status().oldest_age_s >= 3_000
        batch = store.oldest("a", 100)
        assert batch is not None and [m.step for m in batch.metrics] == [0, 1, 2, 3]
    finally:
        store.close()


def test_requeued_points_of_an_ended_run_are_delivered(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=100)
    sent: list[int] = []
    failures = [NotFoundError("run is gone for now")]

    def log_batch(_run_id: str, metrics: Sequence[Metric]) -> None:
        if failures:
            raise failures.pop()
        sent.extend(m.step for m in metrics)

    store.append(MetricBatch.from_points(points("r", 4)))
    store.record_end("r", "FINISHED", 1, applied=True)
    deliverer = MetricDeliverer(
        store, log_batch, batch_size=100, backoff_factor_s=0.01, max_backoff_s=0.02
    )
    deliverer.start()
    try:
        assert deliverer.wait_delivered("r", 10) == 0
        assert store.dead_letter_count("r") == 4
        assert store.requeue("r").points == 4
        deliverer.notify()
        assert deliverer.wait_delivered("r", 10) == 0
        assert store.dead_letter_count("r") == 0
    finally:
        deliverer.stop()
        store.close()
    assert sent == [0, 1, 2, 3]


class RestorableRun:
    """MLflow's side of one run that is deleted until `restored`: its `log_batch` and
    `end_run` refuse for good meanwhile, as MLflow refuses a deleted run."""

    def __init__(self) -> None:
        self.restored = False
        self.steps: list[int] = []
        self.ends: list[tuple[str, str, int]] = []

    def log_batch(self, _run_id: str, metrics: Sequence[Metric]) -> None:
        if not self.restored:
            raise FailedPreconditionError("the run must be in the 'active' state")
        self.steps.extend(m.step for m in metrics)

    def end_run(self, run_id: str, status: str, end_time_ms: int) -> None:
        if not self.restored:
            raise FailedPreconditionError("the run must be in the 'active' state")
        self.ends.append((run_id, status, end_time_ms))


def deliverer_for(store: SpoolStore, mlflow_run: RestorableRun) -> MetricDeliverer:
    return MetricDeliverer(
        store,
        mlflow_run.log_batch,
        batch_size=100,
        backoff_factor_s=0.01,
        max_backoff_s=0.02,
        end_run=mlflow_run.end_run,
    )


def test_an_end_whose_points_were_dead_lettered_is_held_then_applied_after_requeue(
    tmp_path, caplog
):
    store = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=100)
    mlflow_run = RestorableRun()
    store.append(MetricBatch.from_points(points("r", 250)))
    store.record_end("r", "FAILED", 1_234, applied=False)
    deliverer = deliverer_for(store, mlflow_run)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("r", 30) == 0
        assert store.dead_letter_count("r") == 250
        end = store.run_end("r")
        assert end is not None and not end.applied and "active" in end.held
        assert [e.run_id for e in store.status().held_ends] == ["r"]
        assert store.ends_to_apply() == [] and mlflow_run.ends == []
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("250 points of run r" in m and "end (FAILED) is kept" in m for m in said)
        assert not any("after its points were delivered" in m for m in said), said
        mlflow_run.restored = True
        moved = store.requeue("r")
        assert (moved.points, moved.ends) == (250, 1)
        deliverer.notify()
        assert deliverer.wait_delivered("r", 30) == 0
    finally:
        deliverer.stop()
        store.close()
    assert mlflow_run.steps == list(range(250))
    assert mlflow_run.ends == [("r", "FAILED", 1_234)]


def test_an_end_mlflow_refuses_is_held_across_a_restart_until_requeue(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=100)
    mlflow_run = RestorableRun()
    store.record_end("r", "KILLED", 5_678, applied=False)
    deliverer = deliverer_for(store, mlflow_run)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("r", 30) == 0
        # No point was refused: only the held end says the flush is not what it seems.
        ingest = MetricIngest(store, deliverer, flush_timeout_s=5)
        for run_id in ("r", ""):
            flushed = ingest.flush(run_id, timeout_s=0)
            assert (flushed.pending_points, flushed.dead_letter_points) == (0, 0)
            assert (flushed.pending_run_ends, flushed.held_run_ends) == (0, 1)
        assert ingest.flush("other", timeout_s=0).held_run_ends == 0
        assert store.gauges()[3] == 1
    finally:
        deliverer.stop()
        store.close()
    store = SpoolStore(tmp_path / "spool.db", max_points=1000, chunk_points=100)
    try:
        end = store.run_end("r")
        assert end is not None and not end.applied and "active" in end.held
        mlflow_run.restored = True
        moved = store.requeue()
        assert (moved.points, moved.ends) == (0, 1)
        deliverer = deliverer_for(store, mlflow_run)
        deliverer.start()
        try:
            assert deliverer.wait_delivered("r", 30) == 0
        finally:
            deliverer.stop()
        end = store.run_end("r")
        assert end is not None and end.applied and not end.held
        assert store.gauges()[3] == 0
    finally:
        store.close()
    assert mlflow_run.ends == [("r", "KILLED", 5_678)]


def damage_values(path: Path, chunk_id: int) -> None:
    """Cut the last 3 bytes off a spool row's values column, as a damaged file might."""
    db = sqlite3.connect(path)
    db.execute(
        "UPDATE chunks SET vals = substr(vals, 1, length(vals) - 3) WHERE id = ?", (chunk_id,)
    )
    db.commit()
    db.close()


def test_a_damaged_spool_row_is_dead_lettered_once_and_the_rest_delivered(tmp_path, caplog):
    path = tmp_path / "spool.db"
    store = SpoolStore(path, max_points=1000, chunk_points=100)
    for first in (0, 100, 200):
        store.append(MetricBatch.from_points(points("a", 100, start=first)))
    store.append(MetricBatch.from_points(points("b", 50)))
    store.close()
    damage_values(path, 2)  # run a's steps 100-199
    store = SpoolStore(path, max_points=1000, chunk_points=100)
    sent: dict[str, list[int]] = {"a": [], "b": []}

    def log_batch(run_id: str, metrics: Sequence[Metric]) -> None:
        sent[run_id].extend(m.step for m in metrics)

    deliverer = MetricDeliverer(
        store, log_batch, batch_size=100, backoff_factor_s=0.01, max_backoff_s=0.02
    )
    deliverer.start()
    try:
        assert deliverer.wait_delivered("", 30) == 0
        [group] = store.status().dead_letters
    finally:
        deliverer.stop()
        store.close()
    assert sent == {"a": list(range(100)) + list(range(200, 300)), "b": list(range(50))}
    assert (group.run_id, group.points) == ("a", 100)
    assert "spool row 2 of run a is damaged" in group.reason and "key loss" in group.reason
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "spool row 2 of run a" in errors[0], errors
    assert not any("delivery failed" in r.getMessage() for r in caplog.records)
