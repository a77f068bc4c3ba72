"""The data-dir lock and the embedded store's all-or-nothing creation, on real files."""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest

from mlflow_sidecar.server import data_dir_lock
from mlflow_sidecar.server.data_dir_lock import DataDirBusyError, DataDirLock, DataDirLockError
from mlflow_sidecar.server.mlflow_gateway.embedded_store import EmbeddedStoreError, prepare


def test_a_second_lock_on_a_data_dir_is_refused_naming_the_holder(tmp_path):
    with DataDirLock(tmp_path) as first:
        assert first.path.read_text().strip() == str(os.getpid())
        with pytest.raises(DataDirBusyError) as refused:
            DataDirLock(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(refused.value)
        assert "\n" not in str(refused.value)
    # Released: the next one gets it.
    with DataDirLock(tmp_path):
        pass


def test_a_lock_file_this_user_may_only_read_still_locks(tmp_path, monkeypatch):
    # As one left by another user's `spool requeue`: flock needs no write access.
    DataDirLock(tmp_path).path.write_text("4242\n")
    real_open = os.open

    def no_write_access(path, flags, *mode):
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *mode)

    monkeypatch.setattr(data_dir_lock.os, "open", no_write_access)
    with DataDirLock(tmp_path):
        monkeypatch.setattr(data_dir_lock.os, "open", real_open)
        with pytest.raises(DataDirBusyError):
            DataDirLock(tmp_path).acquire()


def test_a_full_disk_does_not_stop_the_lock(tmp_path, monkeypatch):
    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_dir_lock.os, "pwrite", full)
    with DataDirLock(tmp_path), pytest.raises(DataDirBusyError):
        DataDirLock(tmp_path).acquire()


def test_a_lock_that_cannot_be_made_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "sidecar.lock").mkdir()
    with pytest.raises(DataDirLockError) as refused:
        DataDirLock(tmp_path).acquire()
    assert str(tmp_path / "sidecar.lock") in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_embedded_store_is_created_whole_and_leftovers_are_removed(tmp_path):
    leftover = tmp_path / "mlflow.db.partial-1234"
    leftover.write_bytes(b"half a store")
    store = prepare(tmp_path, tmp_path / "artifacts")
    assert store == tmp_path / "mlflow.db" and not leftover.exists()
    db = sqlite3.connect(store)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert {"experiments", "runs", "alembic_version", "registered_models"} <= tables
    assert prepare(tmp_path, tmp_path / "artifacts") == store  # an existing store is kept


def test_a_half_migrated_store_is_explained_in_one_line(tmp_path):
    db = sqlite3.connect(tmp_path / "mlflow.db")
    db.execute("CREATE TABLE experiments (x)")
    db.execute("CREATE TABLE _alembic_tmp_experiments (x)")
    db.commit()
    db.close()
    with pytest.raises(EmbeddedStoreError) as refused:
        prepare(tmp_path, tmp_path / "artifacts")
    message = str(refused.value)
    assert "half-migrated" in message and "_alembic_tmp_experiments" in message
    assert "\n" not in message


def test_a_store_that_is_not_a_database_is_refused_in_one_line_naming_it(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"this is not an sqlite database\n" * 600)
    with pytest.raises(EmbeddedStoreError) as refused:
        prepare(tmp_path, tmp_path / "artifacts")
    message = str(refused.value)
    assert str(tmp_path / "mlflow.db") in message and "not a database" in message
    assert "\n" not in message


def test_files_a_killed_sidecar_left_half_stored_in_the_embedded_store_are_removed(tmp_path):
    # MLflow's local store writes a file under a reserved hidden name, then renames it into
    # place; a sidecar killed in between leaves it, and no listing shows it.
    prepare(tmp_path, tmp_path / "artifacts")
    ckpt = tmp_path / "artifacts" / "1" / "abc" / "artifacts" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "model.pt").write_bytes(b"whole")
    (ckpt / ".artifact.uploading.8zba9y6g").write_bytes(b"half" * 1000)
    (ckpt / ".hidden-but-mine").write_bytes(b"kept")
    prepare(tmp_path, tmp_path / "artifacts")
    assert sorted(p.name for p in ckpt.iterdir()) == [".hidden-but-mine", "model.pt"]
