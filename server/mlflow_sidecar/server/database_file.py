"""The one refusal for a database file of the data dir that SQLite cannot open."""

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
