"""`ModelLease`: the right to read a model's files until `release()`; while any lease on
them is held, the files stay where they are (a cache entry is not evicted, a scratch copy
not removed)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from mlflow_sidecar.server.model_cache.manifest import Manifest


class ModelLease:
    """Files of one model under `root`, described by `manifest` (and verified against it)."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        pin: Callable[[], None],
        unpin: Callable[[], None],
        *,
        cache_entry: str | None = None,
    ) -> None:
        """`pin` takes one more hold on the files (for `share`); `unpin` gives one back.
        `cache_entry`: `root` relative to the model cache's directory, "/"-separated, when
        the files are a cache entry (None: scratch files, not to be named to clients)."""
        self.root = root
        self.manifest = manifest
        self.cache_entry = cache_entry
        self._pin = pin
        self._unpin = unpin
        self._lock = threading.Lock()
        self._released = False

    def share(self) -> ModelLease:
        """Another lease on the same files, released on its own."""
        self._pin()
        return ModelLease(
            self.root, self.manifest, self._pin, self._unpin, cache_entry=self.cache_entry
        )

    def release(self) -> None:
        """Give the files back; later calls do nothing (the call's end and the stream's
        end may both release)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._unpin()


class _Holds:
    """A count of holds that runs `last` when the count drops to zero."""

    def __init__(self, last: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._count = 1
        self._last = last

    def take(self) -> None:
        with self._lock:
            self._count += 1

    def give_back(self) -> None:
        with self._lock:
            self._count -= 1
            done = self._count == 0
        if done:
            self._last()


def scratch_lease(root: Path, manifest: Manifest, remove: Callable[[], None]) -> ModelLease:
    """A lease on files that are not cached: `remove` deletes them after the last release."""
    holds = _Holds(remove)
    return ModelLease(root, manifest, holds.take, holds.give_back)
