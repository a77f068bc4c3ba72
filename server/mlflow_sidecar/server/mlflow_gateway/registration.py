"""Waiting for a new model version to leave PENDING_REGISTRATION, as MLflow's client does,
but never past the call's deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

from mlflow_sidecar.core.domain import ModelVersion, ModelVersionStatus
from mlflow_sidecar.core.errors import DeadlineExceededError, FailedPreconditionError
from mlflow_sidecar.server import call_deadline

# MLflow's client waits up to 300 s for a new version to become READY; so do we, and never
# past the call's deadline (less a margin so that the answer still arrives).
MAX_AWAIT_READY_S = 300.0
DEADLINE_MARGIN_S = 0.05
FIRST_POLL_S = 0.05
MAX_POLL_S = 1.0


def deadline_passed() -> bool:
    """True when the call's deadline leaves no time for one more MLflow call."""
    left = call_deadline.remaining()
    return left is not None and left <= DEADLINE_MARGIN_S


def await_ready(
    version: ModelVersion, get_version: Callable[[str, int], ModelVersion]
) -> ModelVersion:
    """`version` once it has left PENDING_REGISTRATION, asking `get_version` with growing
    pauses; DeadlineExceededError when the deadline or MLflow's limit comes first,
    FailedPreconditionError when the registration failed."""
    started = time.monotonic()
    delay = FIRST_POLL_S
    while version.status is ModelVersionStatus.PENDING_REGISTRATION:
        budget = MAX_AWAIT_READY_S - (time.monotonic() - started)
        if (left := call_deadline.remaining()) is not None:
            budget = min(budget, left - DEADLINE_MARGIN_S)
        if budget <= 0:
            raise DeadlineExceededError(
                f"version {version.version} of {version.name!r} was created but is still"
                " pending registration"
            )
        time.sleep(min(delay, budget))
        delay = min(delay * 2, MAX_POLL_S)
        version = get_version(version.name, version.version)
    if version.status is ModelVersionStatus.FAILED_REGISTRATION:
        raise FailedPreconditionError(
            f"registration of version {version.version} of {version.name!r} failed:"
            f" {version.status_message or 'no reason given'}"
        )
    return version
