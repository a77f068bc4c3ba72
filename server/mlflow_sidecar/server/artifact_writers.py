"""`ArtifactWriters`: one writer per artifact path at a time, within this sidecar.

A store that has begun (a PUT whose body is complete, a file handed to the artifact
store) may still land after its caller's deadline has passed: the caller hears
DEADLINE_EXCEEDED, yet MLflow or the object store goes on. A newer upload of the same
path that overtook it would then be overwritten by the older bytes. So the path stays
held from the moment a store begins until its outcome is known, not until its caller
gives up, and the next writer of that path waits for it (within its own deadline).

Writers in other processes (another sidecar, MLflow's own client) are not ordered by
this: the lock lives in this sidecar's memory.

The paths being written are known too, from the PUT's first byte (`under_way`), so that
removing the empty directories of an abandoned upload (`clearing`) spares a directory
another upload is writing into: MLflow's server keeps a file in progress in its
directory, out of every listing, and the directory looks empty until the file lands.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator

from mlflow_sidecar.core.errors import DeadlineExceededError
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.keyed_locks import KeyedLocks, LockWaitExpiredError

log = logging.getLogger(__name__)


def run_files(run_id: str) -> str:
    """The owner name of a run's artifacts."""
    return f"run {run_id}"


def logged_model_files(model_id: str) -> str:
    """The owner name of a logged model's artifacts."""
    return f"logged model {model_id}"


class ArtifactWriters:
    """Serializes the stores of uploads to one (owner, path). Thread-safe; one instance
    is shared by every service that stores artifact files."""

    def __init__(self) -> None:
        self._locks = KeyedLocks()
        self._guard = threading.Lock()
        self._paths_under_way: Counter[tuple[str, str]] = Counter()
        # Per owner: a directory being removed holds back the writes that would begin in it.
        self._removals = KeyedLocks()

    @contextlib.contextmanager
    def writing(self, owner: str, path: str) -> Iterator[None]:
        """Hold `path` of `owner` (`run_files(...)`, `logged_model_files(...)`) for the
        block, which stores one file and returns (or fails) only once its outcome is known.

        Waits for an earlier writer of the same path within the current call's deadline;
        DeadlineExceededError before anything is stored when the deadline passes first."""

        def waiting() -> None:
            # Worth an operator's eye: the upload's time goes to another one's store.
            log.info(
                "an upload of %r to %s waits for an earlier upload of that path, still being"
                " stored, to finish",
                path,
                owner,
            )

        try:
            with (
                self._locks.hold(
                    f"{owner}\0{path}", timeout=call_deadline.remaining(), on_wait=waiting
                ),
                self.under_way(owner, path),
            ):
                yield
        except LockWaitExpiredError as exc:
            raise DeadlineExceededError(
                f"deadline exceeded while an earlier upload of {path!r} to {owner} was still"
                " being stored; nothing of this upload was stored: send it again with a"
                " longer deadline"
            ) from exc

    @contextlib.contextmanager
    def under_way(self, owner: str, path: str) -> Iterator[None]:
        """Mark `path` of `owner` as being written for the block (from before the store
        first touches the path's directory until its outcome is known): `clearing` then
        removes none of its directories.

        Waits, within the current call's deadline, for a removal of an empty directory of
        `owner` to finish first; DeadlineExceededError when it does not."""
        key = (owner, path)
        try:
            with self._removals.hold(owner, timeout=call_deadline.remaining()), self._guard:
                self._paths_under_way[key] += 1
        except LockWaitExpiredError as exc:
            raise DeadlineExceededError(
                f"deadline exceeded while empty directories of {owner} were being removed;"
                f" nothing of the upload of {path!r} was stored: send it again"
            ) from exc
        try:
            yield
        finally:
            with self._guard:
                self._paths_under_way[key] -= 1
                if not self._paths_under_way[key]:
                    del self._paths_under_way[key]

    @contextlib.contextmanager
    def clearing(self, owner: str, directory: str) -> Iterator[bool]:
        """For a block that removes the directory `directory` of `owner` if it is empty:
        True when no path under it is being written. No write of `owner` begins during
        the block, so that none begins in the directory between its check and its removal.

        Waits for another removal of `owner` as long as the current call's deadline allows;
        LockWaitExpiredError when it does not."""
        with self._removals.hold(owner, timeout=call_deadline.remaining()):
            prefix = f"{directory}/"
            with self._guard:
                spared = any(o == owner and p.startswith(prefix) for o, p in self._paths_under_way)
            yield not spared

    def __len__(self) -> int:
        """How many paths are being stored or waited for right now."""
        return len(self._locks)
