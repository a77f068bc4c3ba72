"""A full disk, however a write path meets it (SQLite's SQLITE_FULL, or ENOSPC), becomes
RESOURCE_EXHAUSTED with reason DISK_FULL and a retry hint: the caller keeps its data and
tries again later, instead of seeing INTERNAL."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator

from mlflow_sidecar.core.errors import DISK_FULL_RETRY_AFTER_S, ErrorReason, ResourceExhaustedError

# SQLite's result code (`sqlite3.SQLITE_FULL` from Python 3.11 on; Python 3.10 has neither the
# constant nor `sqlite_errorcode`, and there the message tells).
SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    """True for SQLite's SQLITE_FULL ("database or disk is full") and for ENOSPC."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or (
            "database or disk is full" in str(exc)
        )
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def disk_full_error(what: str) -> ResourceExhaustedError:
    """RESOURCE_EXHAUSTED, reason DISK_FULL, for a write the disk had no room for."""
    return ResourceExhaustedError(
        f"the disk is full: {what}; retry later",
        reason=ErrorReason.DISK_FULL,
        retry_after_s=DISK_FULL_RETRY_AFTER_S,
    )


@contextlib.contextmanager
def disk_full_as_resource_exhausted(what: str) -> Iterator[None]:
    """Raise `disk_full_error(what)` for a full disk met inside the block."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if is_disk_full(exc):
            raise disk_full_error(what) from exc
        raise
