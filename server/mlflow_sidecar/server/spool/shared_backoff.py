"""`SharedBackoff`: one exponential backoff for every delivery worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import backoff


class SharedBackoff:
    """When MLflow pushes back on one delivery worker, every worker waits.

    Workers take a `ticket` before they send and report how the send ended. A failure
    starts (or lengthens) one wait that all workers sit out before their next send; the
    failures of sends that were already under way when it started do not lengthen it again,
    so N workers failing together back off as one would. A success resets the step.
    """

    def __init__(
        self,
        factor_s: float,
        max_s: float,
        *,
        jitter: Callable[[float], float] = backoff.full_jitter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factor_s = factor_s
        self._max_s = max_s
        self._jitter = jitter
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        # Grows with every failure that counted: a ticket from before it is stale.
        self._epoch = 0
        self._resume_at = 0.0

    def ticket(self) -> int:
        """Taken before a send; hand it to `failed` if the send fails."""
        with self._lock:
            return self._epoch

    def failed(self, ticket: int) -> float | None:
        """A send begun under `ticket` failed: every worker waits. Returns the new wait in
        seconds, or None when a failure since that send began already set one."""
        with self._lock:
            if ticket != self._epoch:
                return None
            self._epoch += 1
            self._failures += 1
            step = min(self._max_s, self._factor_s * 2 ** min(self._failures - 1, 62))
            wait = self._jitter(step)
            self._resume_at = max(self._resume_at, self._clock() + wait)
            return wait

    def succeeded(self) -> None:
        """MLflow took a send: the next failure starts from the first step again. A wait
        already running still runs out."""
        with self._lock:
            self._failures = 0

    def wait(self, stop: threading.Event) -> None:
        """Return once the shared wait is over, or at once when `stop` is set."""
        while not stop.is_set():
            with self._lock:
                left = self._resume_at - self._clock()
            if left <= 0:
                return
            self.pause(left, stop)

    def pause(self, seconds: float, stop: threading.Event) -> None:
        """Sleep `seconds`, or less if `stop` is set meanwhile."""
        stop.wait(seconds)
