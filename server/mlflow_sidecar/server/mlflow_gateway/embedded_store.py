"""The embedded MLflow store (`<data_dir>/mlflow.db`) is created whole or not at all.

MLflow creates a new SQLite store by running its alembic migrations in place. A process
stopped half-way (SIGTERM during a first start) leaves a database that every later start
fails on (`table _alembic_tmp_experiments already exists`). So the first start migrates a
temporary file next to it and renames it into place only once every migration is done: a
stop at any moment leaves either no store (the next start begins again) or a whole one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

STORE_NAME = "mlflow.db"
_PARTIAL = f"{STORE_NAME}.partial-"


class EmbeddedStoreError(RuntimeError):
    """The embedded store cannot be used; the message is one line for people."""


def prepare(data_dir: Path, artifact_root: Path) -> Path:
    """Make sure `<data_dir>/mlflow.db` is a complete MLflow store; returns its path.

    Creates it (migrated in a temporary file, then renamed into place) when it is missing;
    refuses, in one line, a store an older sidecar left half-migrated."""
    _require_sql_store()
    store = data_dir / STORE_NAME
    data_dir.mkdir(parents=True, exist_ok=True)
    for leftover in data_dir.glob(f"{_PARTIAL}*"):
        log.info("removing %s, left by a first start that was stopped", leftover)
        leftover.unlink(missing_ok=True)
    if store.exists():
        _refuse_half_migrated(store)
        _remove_half_stored(artifact_root)
        return store
    partial = data_dir / f"{_PARTIAL}{os.getpid()}"
    log.info("creating the embedded MLflow store %s", store)
    _migrate(partial, artifact_root)
    os.replace(partial, store)
    return store


# The name MLflow's local artifact store gives a file while it is being stored, renamed
# into place once whole; MLflow refuses artifacts named so.
_STORING_PREFIX = ".artifact.uploading."


def _remove_half_stored(artifact_root: Path) -> None:
    """Remove the files a killed sidecar left half stored in the embedded store's artifacts:
    no listing shows them, and nothing else would ever reclaim their space."""
    removed = freed = 0
    for directory, _dirs, files in os.walk(artifact_root):
        for name in files:
            if name.startswith(_STORING_PREFIX):
                path = Path(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    freed += path.lstat().st_size
                    path.unlink()
                    removed += 1
    if removed:
        log.info(
            "removed %d half-stored artifact files (%d bytes) left by a sidecar that was"
            " stopped while storing them",
            removed,
            freed,
        )


def _require_sql_store() -> None:
    """The embedded store is MLflow's SQL store, which the full `mlflow` package brings;
    the `remote` install (mlflow-skinny) talks to a tracking server only."""
    try:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except ModuleNotFoundError as exc:
        raise EmbeddedStoreError(
            f"the embedded MLflow store needs the full mlflow package ({exc}; this looks like"
            " the slim `remote` install with mlflow-skinny): pip install"
            " 'mlflow-sidecar[server]', or set mlflow.tracking_uri"
            " (MLFLOW_SIDECAR__MLFLOW__TRACKING_URI) to a tracking server"
        ) from exc


def _migrate(path: Path, artifact_root: Path) -> None:
    # Imported here: the client side and a tracking-server setup never need it.
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{path}", str(artifact_root))  # type: ignore[no-untyped-call]
    # Close every connection before the rename: nothing may write to the old name after.
    store.engine.dispose()


def _refuse_half_migrated(store: Path) -> None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            leftovers = db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND substr(name, 1, 13) = '_alembic_tmp_'"
            ).fetchall()
    except sqlite3.OperationalError as exc:
        # Locked, unreadable: the file itself may well be fine.
        raise EmbeddedStoreError(
            f"data_dir: cannot open the embedded MLflow store {store} ({exc})"
        ) from exc
    except sqlite3.DatabaseError as exc:
        raise EmbeddedStoreError(
            f"data_dir: cannot open the embedded MLflow store {store} ({exc}): if it is"
            " damaged, restore it from a backup; if it is not the sidecar's, move it aside"
            " and the sidecar creates a new, empty one"
        ) from exc
    if leftovers:
        raise EmbeddedStoreError(
            f"the embedded MLflow store {store} was left half-migrated by a start that was"
            f" stopped during its creation (table {leftovers[0][0]}): if it holds no runs you"
            " need, remove it and start again; otherwise restore it from a backup"
        )
