"""The data dir's databases (spool.db, requests.db) are checked for writing when opened,
and keep SQLite's temporary data in memory: the data dir is all they write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mlflow_sidecar.server.database_file import DatabaseFileError
from mlflow_sidecar.server.idempotency.ledger import RequestLedger
from mlflow_sidecar.server.spool import store as spool_store
from mlflow_sidecar.server.spool.store import SpoolStore

MEMORY = 2  # PRAGMA temp_store: 0 default (files), 1 file, 2 memory


def test_a_spool_this_user_may_only_read_is_refused_when_opened(tmp_path, monkeypatch):
    # As SQLite opens a file whose owner is another user: read-only, saying nothing
    # until the first write. Root may write any file, so the read-only open is forced.
    path = tmp_path / "spool.db"
    SpoolStore(path, max_points=100).close()
    connect = sqlite3.connect

    def read_only(database: Path, **options: object) -> sqlite3.Connection:
        return connect(f"file:{database}?mode=ro", uri=True, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_store.sqlite3, "connect", read_only)
    with pytest.raises(DatabaseFileError) as refused:
        SpoolStore(path, max_points=100)
    assert str(path) in str(refused.value)
    assert "readonly" in str(refused.value)


def test_the_spool_and_the_ledger_keep_temporary_data_in_memory(tmp_path):
    spool = SpoolStore(tmp_path / "spool.db", max_points=100)
    ledger = RequestLedger(tmp_path / "requests.db", retention_s=60)
    try:
        assert spool._db.execute("PRAGMA temp_store").fetchone()[0] == MEMORY
        assert ledger._db.execute("PRAGMA temp_store").fetchone()[0] == MEMORY
    finally:
        spool.close()
        ledger.close()
