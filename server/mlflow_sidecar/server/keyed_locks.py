"""Locks by key (a model name, a client request id) that are dropped when unused."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


class LockWaitExpiredError(Exception):
    """The lock of a key did not come free within the wait allowed for it."""


class KeyedLocks:
    """`with locks.hold(key):` serializes callers that hold the same key, and only those."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(
        self,
        key: str,
        *,
        timeout: float | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        """Hold the lock of `key` for the duration of the block.

        `timeout`: at most this many seconds to wait for it (None: as long as it takes),
        else LockWaitExpiredError before the block runs. `on_wait` is called once when
        another holder makes this caller wait."""
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            if not lock.acquire(blocking=False):
                if on_wait is not None:
                    on_wait()
                if not lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                    raise LockWaitExpiredError(f"{key!r} stayed held for {timeout} s")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)
