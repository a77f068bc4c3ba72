"""`ArtifactWriters`: one writer per artifact path at a time, within this sidecar.

A store that has begun (a PUT whose body is complete, a file handed to the artifact
store) may still land after its caller's deadline has passed: the caller hears
DEADLINE_EXCEEDED, yet MLflow or the object store goes on. A newer upload of the same
path that overtook it would then be overwritten by the older bytes. So the path stays
held from the moment a store begins until its outcome is known, not until its caller
gives up, and the next writer of that path waits for it (within its own deadline).

Writers in other processes (another sidecar, MLflow's own client) are not ordered by
this: the lock lives in this sidecar's memory.
"""

from __future__ import annotations

import contextlib
import logging
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
            with self._locks.hold(
                f"{owner}\0{path}", timeout=call_deadline.remaining(), on_wait=waiting
            ):
                yield
        except LockWaitExpiredError as exc:
            raise DeadlineExceededError(
                f"deadline exceeded while an earlier upload of {path!r} to {owner} was still"
                " being stored; nothing of this upload was stored: send it again with a"
                " longer deadline"
            ) from exc

    def __len__(self) -> int:
        """How many paths are being stored or waited for right now."""
        return len(self._locks)
