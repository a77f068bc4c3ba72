"""`RunClaims`: which delivery worker has which run, handed out round-robin."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class RunClaims:
    """Hands each worker a run no other worker has, so a run's batches go one at a time
    (in order) while different runs go in parallel.

    Runs are visited in rounds, each run with work once a round, so a run with many points
    does not hold the others back. A worker with nothing to claim waits for `wake`.
    """

    def __init__(self, candidates: Callable[[], list[str]]) -> None:
        # Runs with something to deliver (or an end to apply), asked again every round.
        self._candidates = candidates
        self._lock = threading.Condition()
        self._claimed: set[str] = set()
        # Runs a `held` waits for: no worker claims them again meanwhile, so the wait is for
        # the step in progress, not for the run's whole backlog.
        self._wanted: Counter[str] = Counter()
        self._round: deque[str] = deque()
        # Counts wakes, so that a worker that looked before a wake does not sleep through it.
        self._wakes = 0

    def wakes(self) -> int:
        """Taken before looking for work; hand it to `wait_for_work`."""
        with self._lock:
            return self._wakes

    def claim(self) -> str | None:
        """A run with work that no worker has, now this worker's until `release`; None when
        every such run is claimed."""
        with self._lock:
            for fresh in (False, True):
                if fresh:
                    self._round = deque(self._candidates())
                while self._round:
                    run_id = self._round.popleft()
                    if run_id not in self._claimed and run_id not in self._wanted:
                        self._claimed.add(run_id)
                        return run_id
            return None

    @contextmanager
    def held(self, run_id: str, timeout_s: float) -> Iterator[None]:
        """Keep the run from every worker while the block runs, after waiting for the
        worker that has it now (if any) to release it: TimeoutError after `timeout_s`."""
        with self._lock:
            self._wanted[run_id] += 1
            try:
                if not self._lock.wait_for(lambda: run_id not in self._claimed, timeout_s):
                    raise TimeoutError(f"run {run_id} stayed claimed for {timeout_s:.1f}s")
            finally:
                self._wanted[run_id] -= 1
                if not self._wanted[run_id]:
                    del self._wanted[run_id]
            self._claimed.add(run_id)
        try:
            yield
        finally:
            self.release(run_id)
            self.wake()

    def release(self, run_id: str) -> None:
        """The worker is done with the run for now."""
        with self._lock:
            self._claimed.discard(run_id)
            # A `held` may be waiting for this run.
            self._lock.notify_all()

    def wake(self) -> None:
        """There may be new work (or a stop): waiting workers look again."""
        with self._lock:
            self._wakes += 1
            self._lock.notify_all()

    def wait_for_work(self, wakes: int, timeout_s: float) -> None:
        """Wait for a `wake` after the one counted in `wakes`, at most `timeout_s`."""
        with self._lock:
            self._lock.wait_for(lambda: self._wakes != wakes, timeout_s)
