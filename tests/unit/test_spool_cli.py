"""`mlflow-sidecar spool requeue|export` and `serve`'s refusals, on a real spool file."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest

from mlflow_sidecar.core.domain import MetricPoint
from mlflow_sidecar.server.cli import main
from mlflow_sidecar.server.data_dir_lock import DataDirLock
from mlflow_sidecar.server.metric_batch import MetricBatch
from mlflow_sidecar.server.spool.store import SCHEMA_VERSION, STATUS_GROUPS, SpoolStore
from tests.support.sidecar_process import CLI


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_SIDECAR_CONFIG", raising=False)
    store = SpoolStore(tmp_path / "spool.db", max_points=1000)
    store.append(
        MetricBatch.from_points(
            [MetricPoint("a", "loss", 0.5, 1_000, 7), MetricPoint("b", "acc", 2.0, 2_000, 8)]
        )
    )
    store.dead_letter("a", "NOT_FOUND: run a is gone")
    store.dead_letter("b", "NOT_FOUND: run b is gone")
    store.close()
    return tmp_path


def test_export_prints_every_dead_letter_as_json(data_dir, capsys):
    assert main(["spool", "export", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {
            "run_id": "a",
            "key": "loss",
            "value": 0.5,
            "step": 7,
            "timestamp_ms": 1_000,
            "reason": "NOT_FOUND: run a is gone",
            "dead_ms": pytest.approx(0, abs=10**13),
        },
        {
            "run_id": "b",
            "key": "acc",
            "value": 2.0,
            "step": 8,
            "timestamp_ms": 2_000,
            "reason": "NOT_FOUND: run b is gone",
            "dead_ms": pytest.approx(0, abs=10**13),
        },
    ]


def test_export_writes_values_that_are_no_number_as_strict_json_reads_them(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_SIDECAR_CONFIG", raising=False)
    store = SpoolStore(tmp_path / "spool.db", max_points=1000)
    values = [math.nan, math.inf, -math.inf, -0.0]
    store.append(
        MetricBatch.from_points(
            [MetricPoint("a", "loss", v, 1_000, i) for i, v in enumerate(values)]
        )
    )
    store.dead_letter("a", "NOT_FOUND: run a is gone")
    store.close()
    assert main(["spool", "export", "--json"]) == 0

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    letters = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert [letter["value"] for letter in letters] == ["NaN", "Infinity", "-Infinity", -0.0]


def test_status_says_how_many_runs_of_dead_letters_it_leaves_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_SIDECAR_CONFIG", raising=False)
    store = SpoolStore(tmp_path / "spool.db", max_points=1000)
    runs = [f"run{i}" for i in range(STATUS_GROUPS + 3)]
    store.append(MetricBatch.from_points([MetricPoint(r, "loss", 1.0, 1_000, 0) for r in runs]))
    for run in runs:
        store.dead_letter(run, f"NOT_FOUND: {run} is gone")
    store.close()
    assert main(["spool", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["dead_letter_points"] == len(runs)
    assert len(status["dead_letters"]) == STATUS_GROUPS
    assert status["dead_letter_groups_unlisted"] == 3
    assert main(["spool", "status"]) == 0
    assert "and 3 more runs and reasons, not listed" in capsys.readouterr().out


def test_export_says_what_it_cannot_print_of_a_damaged_row(data_dir, capsys):
    db = sqlite3.connect(data_dir / "spool.db")
    db.execute("UPDATE dead_letters SET vals = substr(vals, 1, 5) WHERE run_id = 'a'")
    db.commit()
    db.close()
    assert main(["spool", "export", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [letter["run_id"] for letter in json.loads(out)] == ["b"]
    assert "1 dead-lettered points are in spool rows damaged beyond reading" in err


def test_spool_commands_leave_a_trainers_mlflow_variables_alone(data_dir, monkeypatch, capsys):
    # The trainer's own environment points MLflow at the sidecar; the spool never uses it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sidecar://127.0.0.1:50051")
    assert main(["spool", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dead_letter_points"] == 2


def test_requeue_moves_one_runs_dead_letters_back_to_pending(data_dir, capsys):
    assert main(["spool", "requeue", "--run", "a"]) == 0
    assert "requeued 1 " in capsys.readouterr().out
    store = SpoolStore(data_dir / "spool.db", max_points=1000)
    try:
        assert store.pending("a") == 1 and store.dead_letter_count("a") == 0
        assert store.dead_letter_count("b") == 1
    finally:
        store.close()


def test_requeue_of_an_empty_run_id_is_refused_and_touches_no_run(data_dir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["spool", "requeue", "--run", ""])
    assert exited.value.code == 2
    assert "--run" in capsys.readouterr().err
    store = SpoolStore(data_dir / "spool.db", max_points=1000)
    try:
        assert store.pending() == 0 and store.dead_letter_count() == 2
    finally:
        store.close()


def test_status_lists_a_held_run_end_and_requeue_brings_it_back(data_dir, capsys):
    store = SpoolStore(data_dir / "spool.db", max_points=1000)
    store.record_end("a", "FAILED", 9_000, applied=False)
    store.hold_end("a", "FAILED_PRECONDITION: run a is deleted")
    store.close()
    assert main(["spool", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["held_run_ends"] == [
        {
            "run_id": "a",
            "status": "FAILED",
            "end_time_ms": 9_000,
            "reason": "FAILED_PRECONDITION: run a is deleted",
        }
    ]
    assert main(["spool", "status"]) == 0
    assert "run a: FAILED at 9000 ms: FAILED_PRECONDITION: run a is deleted" in (
        capsys.readouterr().out
    )
    assert main(["spool", "requeue", "--run", "a"]) == 0
    assert "requeued 1 dead-lettered points and 1 held run ends of run a" in (
        capsys.readouterr().out
    )
    store = SpoolStore(data_dir / "spool.db", max_points=1000)
    try:
        assert [end.run_id for end in store.ends_to_apply()] == ["a"]
        assert store.status().held_ends == ()
    finally:
        store.close()


def test_requeue_is_refused_while_a_sidecar_holds_the_data_dir(data_dir, capsys):
    with DataDirLock(data_dir):
        assert main(["spool", "requeue"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {os.getpid()}" in err
    store = SpoolStore(data_dir / "spool.db", max_points=1000)
    try:
        assert store.dead_letter_count() == 2 and store.pending() == 0
    finally:
        store.close()


def spool_version(data_dir, set_to: int | None = None) -> int:
    db = sqlite3.connect(data_dir / "spool.db")
    try:
        if set_to is not None:
            db.execute(f"PRAGMA user_version={set_to}")
            db.commit()
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("command", [["status"], ["export", "--json"]])
def test_reading_an_older_spool_leaves_it_as_the_older_sidecar_serving_it_wrote_it(
    data_dir, capsys, command
):
    older = spool_version(data_dir, set_to=SCHEMA_VERSION - 1)
    # As during a rollout: the older sidecar serves the data dir, the newer CLI reads it.
    with DataDirLock(data_dir):
        assert main(["spool", *command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"schema version {older}, older than this mlflow-sidecar's {SCHEMA_VERSION}" in err
    assert spool_version(data_dir) == older


def test_requeue_upgrades_an_older_spool_only_once_it_holds_the_data_dir(data_dir, capsys):
    older = spool_version(data_dir, set_to=SCHEMA_VERSION - 1)
    with DataDirLock(data_dir):
        assert main(["spool", "requeue"]) == 2
    assert spool_version(data_dir) == older
    assert main(["spool", "requeue"]) == 0
    assert spool_version(data_dir) == SCHEMA_VERSION
    assert "requeued 2 dead-lettered points" in capsys.readouterr().out


def test_serve_refuses_a_spool_newer_than_the_code_in_one_line(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "0")
    db = sqlite3.connect(data_dir / "spool.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "newer than this sidecar" in err


@pytest.mark.parametrize("name", ["spool.db", "requests.db"])
def test_serve_refuses_a_database_file_that_is_not_sqlite_in_one_line(
    name, data_dir, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "0")
    (data_dir / name).write_bytes(os.urandom(8192))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "data_dir" in err and str(data_dir / name) in err and "not a database" in err


def leave_a_write_ahead_log(path) -> None:
    """Write to `path` in WAL mode from a process that dies before it checkpoints, as a
    killed sidecar leaves its database; then cut the database file to nothing."""
    script = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL')\n"
        "db.execute('CREATE TABLE IF NOT EXISTS kept (x BLOB)')\n"
        "db.execute('INSERT INTO kept VALUES (zeroblob(100000))')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert path.with_name(f"{path.name}-wal").stat().st_size > 32
    path.write_bytes(b"")


@pytest.mark.parametrize("name", ["spool.db", "requests.db"])
def test_serve_refuses_a_database_emptied_under_its_write_ahead_log_in_one_line(
    name, data_dir, monkeypatch
):
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "0")
    leave_a_write_ahead_log(data_dir / name)
    # A process of its own: a serve that took the file would serve until stopped.
    try:
        served = subprocess.run(
            [CLI, "serve"], capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve started on an emptied {name} instead of refusing it")
    err = served.stderr.strip()
    assert served.returncode == 2 and len(err.splitlines()) == 1, err
    assert str(data_dir / name) in err and "write-ahead log" in err
    assert (data_dir / name).stat().st_size == 0  # left as found, for whoever looks


def test_spool_status_refuses_a_spool_emptied_under_its_write_ahead_log(data_dir, capsys):
    leave_a_write_ahead_log(data_dir / "spool.db")
    assert main(["spool", "status"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(data_dir / "spool.db") in err


def test_spool_status_refuses_a_spool_that_is_not_sqlite_in_one_line(data_dir, capsys):
    (data_dir / "spool.db").write_bytes(os.urandom(8192))
    for leftover in ("spool.db-wal", "spool.db-shm"):
        (data_dir / leftover).unlink(missing_ok=True)
    assert main(["spool", "status"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(data_dir / "spool.db") in err
