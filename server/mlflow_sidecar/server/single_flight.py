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
        self.followers = 0
        self.shares: list[V] = []
        self.error: BaseException | None = None


class SingleFlight(Generic[K, V]):
    """`run(key, work, share)`: the first caller for `key` runs `work`; callers that arrive
    while it runs wait and get `share(result)` each (or its exception). A caller after the
    work has finished starts a new run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[K, _Flight[V]] = {}

    def run(self, key: K, work: Callable[[], V], share: Callable[[V], V]) -> V:
        """The result of `work`, run once for everyone asking for `key` meanwhile."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                flight.followers += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            with self._lock:
                return flight.shares.pop()
        try:
            result = work()
        except BaseException as exc:
            with self._lock:
                del self._flights[key]
                flight.error = exc
            flight.done.set()
            raise
        with self._lock:
            # Shares are made before the flight ends, so the result cannot be released
            # by the leader before every follower holds its own.
            del self._flights[key]
            flight.shares = [share(result) for _ in range(flight.followers)]
        flight.done.set()
        return result
