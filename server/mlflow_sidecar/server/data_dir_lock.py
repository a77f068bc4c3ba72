"""`DataDirLock`: one sidecar per data dir, held with `fcntl.flock` on
`<data_dir>/sidecar.lock`, which names the holder's pid.

The kernel releases a flock when its process ends, however it ends, so a killed sidecar
never leaves a stale lock behind; the pid in the file is only there to name the holder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_NAME = "sidecar.lock"


class DataDirBusyError(RuntimeError):
    """Another process holds the data dir; the message is one line naming its pid."""


class DataDirLock:
    """An exclusive, non-blocking lock on a data dir for the life of this process."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise DataDirBusyError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirBusyError(
                f"the data dir {self.path.parent} is in use by another mlflow-sidecar"
                f" (pid {holder}, lock {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

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
