"""Checks, after the answer, for creates of a call that land in MLflow late.

A create whose try ended without an answer (a timeout, a lost connection, a 5xx) may
not have reached MLflow yet, and may still reach it after a later try made the entity
the call answered with: a proxy or a busy MLflow holds the request
and passes it on later. Looking before creating cannot see a write that has not landed
yet, so a call that met such a try has its entity looked for again a few times after it
answered, and a second one made for the same request id is removed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# After the answer, in units of `mlflow.request_timeout_s`: a held request that MLflow
# still takes is taken within a few of its timeouts, or its client (and a proxy's) has
# long given up on it.
CHECK_AFTER_TIMEOUTS = (1, 2, 4, 8, 16)


class LateWriteChecks:
    """Runs each scheduled check at its times, in one background thread started when the
    first check is scheduled. A check returns how many late entities it removed; one that
    fails is logged and tried again at its next time. Checks still due when the process
    stops are not made (a WARNING at `stop()` names how many)."""

    def __init__(self, request_timeout_s: float, on_removed: Callable[[str, int], None]) -> None:
        self._delays = tuple(request_timeout_s * n for n in CHECK_AFTER_TIMEOUTS)
        self._on_removed = on_removed
        self._due: list[tuple[float, int, str, str, Callable[[], int]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def delays_s(self) -> Sequence[float]:
        """The times after the answer at which a call's entity is looked for again."""
        return self._delays

    def schedule(self, kind: str, what: str, check: Callable[[], int]) -> None:
        """Look again at `delays_s` after now; `kind` labels what `check` removes (`run`,
        `model_version`) and `what` names the call's entity in the logs."""
        now = time.monotonic()
        with self._wake:
            if self._closed:
                return
            for delay in self._delays:
                heapq.heappush(self._due, (now + delay, next(self._order), kind, what, check))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="late-write-checks", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        log.info(
            "a try of the call that made %s ended without MLflow's answer; a second %s of"
            " its request id is looked for over the next %.0f s, should that try land late",
            what,
            kind.replace("_", " "),
            self._delays[-1],
        )

    def pending(self) -> int:
        """Checks not yet made."""
        with self._wake:
            return len(self._due)

    def start(self) -> None:
        """Nothing to begin: the thread starts with the first check scheduled."""

    def stop(self, timeout_s: float) -> None:
        """Stop at once (`timeout_s` is not needed); checks not yet made are dropped, with a
        WARNING naming how many."""
        with self._wake:
            self._closed = True
            dropped = len(self._due)
            self._due.clear()
            self._wake.notify()
        if dropped:
            log.warning(
                "stopping with %d checks for late creates not yet made: a create that lands"
                " in MLflow after this keeps its second entity, tagged with the request id",
                dropped,
            )

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._wake.wait(timeout)
                if self._closed:
                    return
                _, _, kind, what, check = heapq.heappop(self._due)
            try:
                removed = check()
            except Exception as exc:  # noqa: BLE001 - logged; the next time tries again
                log.warning("could not look for a late create of %s: %s", what, exc)
                continue
            if removed:
                log.warning(
                    "removed %d %s(s) made by a late try of the call that made %s",
                    removed,
                    kind,
                    what,
                )
                self._on_removed(kind, removed)
