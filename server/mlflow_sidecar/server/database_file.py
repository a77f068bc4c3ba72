"""The one refusal for a database file of the data dir that SQLite cannot open, or that
it would open as empty though it was not."""

from __future__ import annotations

import sqlite3
from pathlib import Path


class DatabaseFileError(RuntimeError):
    """A database of the data dir (spool.db, requests.db) SQLite cannot open: a file that
    is not a database, or one it cannot read; the message is one line for people."""

    @classmethod
    def of(cls, path: Path, exc: sqlite3.Error) -> DatabaseFileError:
        """The refusal for `path`, which failed with `exc`."""
        if isinstance(exc, sqlite3.OperationalError):
            # Locked, unreadable, a full disk: the file itself may well be fine.
            return cls(f"data_dir: cannot open {path} ({exc})")
        return cls(
            f"data_dir: cannot open {path} ({exc}): if it is damaged or not the sidecar's,"
            " move it aside and the sidecar starts a new one"
        )


# A write-ahead log starts with a 32-byte header; anything past it is frames of changes.
_WAL_HEADER_BYTES = 32


def refuse_emptied(path: Path) -> None:
    """DatabaseFileError when `path` is empty while its write-ahead log holds changes.

    SQLite opens such a file as a new, empty database: the pages the log does not hold
    were in the file, so what it held would be lost without a word. A database in WAL mode
    is never empty once it has a log (switching to WAL writes the file's first page), so
    this is damage, never a new database."""
    wal = path.with_name(f"{path.name}-wal")
    try:
        emptied = path.stat().st_size == 0 and wal.stat().st_size > _WAL_HEADER_BYTES
    except FileNotFoundError:
        return
    if emptied:
        raise DatabaseFileError(
            f"data_dir: cannot open {path}: the file is empty while its write-ahead log"
            f" {wal.name} holds {wal.stat().st_size} bytes of changes to it: it was cut"
            " short, and SQLite would open it as a new, empty database; move"
            f" {path.name}, {wal.name} and {path.name}-shm aside and the sidecar starts a"
            " new one"
        )
