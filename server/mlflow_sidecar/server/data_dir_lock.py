"""`DataDirLock`: one sidecar per data dir, held with `fcntl.flock` on
`<data_dir>/sidecar.lock`, which names the holder's pid.

The kernel releases a flock when its process ends, however it ends, so a killed sidecar
never leaves a stale lock behind; the pid in the file is only there to name the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_NAME = "sidecar.lock"


class DataDirLockError(RuntimeError):
    """The data dir's lock could not be taken; the message is one line saying why."""


class DataDirBusyError(DataDirLockError):
    """Another process holds the data dir; the message is one line naming its pid."""


class DataDirLock:
    """An exclusive, non-blocking lock on a data dir for the life of this process."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise DataDirBusyError naming the holder
        (DataDirLockError when the lock file cannot be made or opened at all)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._open()
        except OSError as exc:
            raise DataDirLockError(
                f"cannot take the data dir lock {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirBusyError(
                f"the data dir {self.path.parent} is in use by another mlflow-sidecar"
                f" (pid {holder}, lock {self.path})"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise DataDirLockError(
                f"cannot take the data dir lock {self.path}: {exc.strerror or exc}"
            ) from None
        # The pid only names the holder: a full disk or a lock file this user may only
        # read (left by another user's `spool requeue`) does not stop the lock itself.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            # flock needs no write access: a lock file owned by another user still locks.
            return os.open(self.path, os.O_RDONLY)

    def release(self) -> None:
        """Give the lock up (the process ending does it as well)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
