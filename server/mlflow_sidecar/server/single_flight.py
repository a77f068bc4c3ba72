"""`SingleFlight`: concurrent calls for one key share one run of the work."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Flight(Generic[V]):
    def __init__(self) -> None:
        self.done = threading.Event()
        # Set under the lock once the shares are made (or the run failed): a waiter that
        # gives up before it may leave; one after it holds a share it must take.
        self.ended = False
        self.followers = 0
        self.shares: list[V] = []
        self.error: BaseException | None = None


def _never(_: BaseException) -> bool:
    return False


def _no_limit() -> float | None:
    return None


class SingleFlight(Generic[K, V]):
    """`run(key, work, share)`: the first caller for `key` runs `work`; callers that arrive
    while it runs wait and get `share(result)` each (or its exception). A caller after the
    work has finished starts a new run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[K, _Flight[V]] = {}

    def run(
        self,
        key: K,
        work: Callable[[], V],
        share: Callable[[V], V],
        *,
        run_again: Callable[[BaseException], bool] = _never,
        patience_s: Callable[[], float | None] = _no_limit,
        gave_up: Callable[[], BaseException] | None = None,
    ) -> V:
        """The result of `work`, run once for everyone asking for `key` meanwhile.

        `run_again(error)`, asked by each waiting caller in its own thread when the run it
        waited for failed: True when the error was the running caller's own (its deadline
        passed) and not this one's, which then runs the work again (one of the waiters
        does, the others wait for it) instead of raising it.

        `patience_s()`, asked by each waiting caller: how long it may wait (None: as long
        as the run takes). One whose time runs out first raises `gave_up()` (default
        TimeoutError) and leaves the run, which then makes no share for it."""
        while True:
            with self._lock:
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight()
                else:
                    flight.followers += 1
            if leader:
                return self._lead(key, flight, work, share)
            if not flight.done.wait(patience_s()):
                with self._lock:
                    if not flight.ended:
                        flight.followers -= 1
                        raise gave_up() if gave_up else TimeoutError(f"gave up waiting on {key!r}")
            if flight.error is None:
                with self._lock:
                    return flight.shares.pop()
            if not run_again(flight.error):
                raise flight.error

    def _lead(
        self, key: K, flight: _Flight[V], work: Callable[[], V], share: Callable[[V], V]
    ) -> V:
        try:
            result = work()
        except BaseException as exc:
            with self._lock:
                del self._flights[key]
                flight.error = exc
                flight.ended = True
            flight.done.set()
            raise
        with self._lock:
            # Shares are made before the flight ends, so the result cannot be released
            # by the leader before every follower holds its own.
            del self._flights[key]
            flight.shares = [share(result) for _ in range(flight.followers)]
            flight.ended = True
        flight.done.set()
        return result
