"""The deadline of the RPC being served, visible to code deep below the servicer.

The error interceptor sets it from `ServicerContext.time_remaining()`; the MLflow
gateway bounds its retries by it. A context variable keeps concurrent calls apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator

# What cleanup after a failed call gets of its own: the call's deadline has often passed
# by then (that is why it failed), and a cleanup under it could never reach MLflow.
CLEANUP_S = 30.0

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
# Set once grpc has ended the call (its client cancelled it or left): nothing the call
# still waits for can reach its client any more.
_ended: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "ended", default=None
)


@contextlib.contextmanager
def deadline_scope(
    remaining_s: float | None, ended: threading.Event | None = None
) -> Iterator[None]:
    """Within the block, `remaining()` counts down from `remaining_s` (None: no deadline),
    and is 0 once `ended` is set."""
    token = _deadline.set(None if remaining_s is None else time.monotonic() + remaining_s)
    ended_token = _ended.set(ended)
    try:
        yield
    finally:
        _ended.reset(ended_token)
        _deadline.reset(token)


def call_ended() -> bool:
    """True once grpc has ended the current call (cancelled, its client gone)."""
    ended = _ended.get()
    return ended is not None and ended.is_set()


def remaining() -> float | None:
    """Seconds left until the current call's deadline, or None when it has none; 0 once
    the call has ended, so that whatever it waits for stops waiting."""
    if call_ended():
        return 0.0
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def expired() -> bool:
    """True when the current call has a deadline and it has passed."""
    left = remaining()
    return left is not None and left <= 0


@contextlib.contextmanager
def cleanup_scope() -> Iterator[None]:
    """Within the block the call's deadline is replaced by CLEANUP_S of its own, for
    undoing what a failed call left behind."""
    with deadline_scope(CLEANUP_S):
        yield
