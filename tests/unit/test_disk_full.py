"""A full disk on a staging write is RESOURCE_EXHAUSTED (DISK_FULL), not INTERNAL."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from mlflow_sidecar.core.errors import ResourceExhaustedError
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.disk_full import is_disk_full
from mlflow_sidecar.server.staging import Staging


def test_enospc_while_staging_is_disk_full_and_the_directory_is_removed(tmp_path):
    staging = Staging(load_config(data_dir=tmp_path))
    with pytest.raises(ResourceExhaustedError) as refused, staging.directory("upload") as path:
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "file"))
    assert refused.value.reason == "DISK_FULL" and refused.value.retry_after_s
    assert staging.in_flight() == []


def test_other_os_errors_are_not_disk_full(tmp_path):
    staging = Staging(load_config(data_dir=tmp_path))
    with pytest.raises(PermissionError), staging.directory("upload"):
        raise PermissionError(errno.EACCES, "denied")


def test_sqlite_full_is_recognised_from_a_real_database(tmp_path):
    db = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    db.execute("CREATE TABLE t (x BLOB)")
    db.execute("PRAGMA max_page_count=3")
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("INSERT INTO t VALUES (zeroblob(1000000))")
    db.close()
    assert is_disk_full(full.value)
