"""`DeliveryConcurrency`: how many `log_batch` calls the deliverer keeps in flight, fitted
to what MLflow gains from them."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A level's rate counts for this long; then the level is measured again, since what the
# server gains from concurrency changes with its load and its other clients.
_FRESH_S = 60.0
# The fewest calls that deliver within this fraction of the best level are enough: on a
# server that serialises writes (SQLite) extra calls only wait on its lock, and each of
# them holds a point back from MLflow for longer. Measured against the best level, not
# the next one, so that steps that each add a little cannot add up to a large loss.
_MARGIN = 0.05
# A measurement ends after this much delivery time and at least this many calls per slot:
# shorter ones, of calls that can take half a second each, are mostly noise.
_EPOCH_S = 2.0
_EPOCH_CALLS_PER_SLOT = 4


@dataclass
class _Rate:
    points_per_s: float
    at: float


class DeliveryConcurrency:
    """Slots for the deliverer's `log_batch` calls, between 1 and `most`.

    Whether parallel calls help depends on the server behind MLflow: several workers on
    PostgreSQL take them side by side, a server on SQLite takes one write at a time and
    makes the others wait on its lock, so they only add latency. The limit follows what is
    measured: points MLflow confirmed per second of delivery (time with calls in flight
    or a worker at work, `working`), at each level. It starts at `most` and steps by one
    towards the fewest calls that deliver within `_MARGIN` of the best level measured: a
    level short of that moves towards the best one; a level within it first tries one call
    more when that level was not measured lately (the best may be there), then one call
    fewer. A level's figure is measured again once it is older than `_FRESH_S`; each
    measurement ends after whole rounds of calls, one per slot.
    A call MLflow pushed back on halves the limit, once for the calls in flight with it.

    A slot given back goes straight to the worker that has waited longest, so one that has
    just finished a call cannot take it ahead of one that was waiting.
    """

    def __init__(self, most: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if most < 1:
            raise ValueError(f"delivery needs at least one call in flight, not {most}")
        self._most = most
        self._clock = clock
        self._lock = threading.Lock()
        self._limit = most
        self._in_flight = 0
        # Calls in flight plus workers at work: delivery is under way while it is not 0.
        self._active = 0
        self._waiting: deque[threading.Event] = deque()
        self._rates: dict[int, _Rate] = {}
        # The current measurement: busy time before `_busy_since`, points and calls.
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._points = 0
        self._calls = 0
        # Calls still out from before the last change of limit: the measurement at the new
        # limit starts once they are back, so that none of them counts for it.
        self._carried_over = 0

    @property
    def limit(self) -> int:
        """Calls allowed in flight now."""
        with self._lock:
            return self._limit

    @property
    def most(self) -> int:
        """The most calls ever allowed in flight (`spool.delivery_workers`)."""
        return self._most

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """A worker's turn with a run (reading the spool, sending, deleting what MLflow
        confirmed): its time counts as delivery time, since it is part of what each
        level of concurrency costs."""
        with self._lock:
            self._activate()
        try:
            yield
        finally:
            with self._lock:
                self._deactivate()

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for a slot, in turn; False (and no slot) if `stop` is set meanwhile."""
        with self._lock:
            if self._in_flight < self._limit:
                self._take()
                return True
            granted = threading.Event()
            self._waiting.append(granted)
        while not granted.wait(0.1):
            if stop is not None and stop.is_set():
                with self._lock:
                    if granted.is_set():
                        break
                    self._waiting.remove(granted)
                return False
        return True

    def try_acquire(self) -> bool:
        """A slot if one is free; never waits."""
        with self._lock:
            if self._in_flight >= self._limit:
                return False
            self._take()
            return True

    def release(self) -> None:
        """Give back a slot that sent nothing."""
        with self._lock:
            self._give_back()
            self._settle()

    def sent(self, points: int, *, pushed_back: bool = False) -> None:
        """Give back a slot whose call has ended: `points` confirmed by MLflow, or
        `pushed_back` if MLflow failed it for a reason a retry may get past."""
        with self._lock:
            self._give_back()
            if self._settle():
                # Sent before the last change of limit: a push-back on it is part of the
                # one that changed it (calls failing together halve the limit once).
                return
            if pushed_back:
                self._set_limit(max(1, self._limit // 2))
                return
            self._points += points
            self._calls += 1
            busy_s = self._busy_s
            if self._busy_since is not None:
                busy_s += self._clock() - self._busy_since
            # Whole rounds of calls only (one per slot): the time counted so far includes
            # the work of the calls still out, whose points are not in yet, so that a
            # measurement ending mid-round would count more calls short the higher the
            # level.
            if (
                busy_s >= _EPOCH_S
                and self._calls >= _EPOCH_CALLS_PER_SLOT * self._limit
                and self._calls % self._limit == 0
            ):
                self._measured(self._points / busy_s)

    # -- under the lock ------------------------------------------------------------------

    def _take(self) -> None:
        self._in_flight += 1
        self._activate()

    def _give_back(self) -> None:
        self._in_flight -= 1
        self._deactivate()
        self._hand_out()

    def _activate(self) -> None:
        if self._active == 0:
            self._busy_since = self._clock()
        self._active += 1

    def _deactivate(self) -> None:
        self._active -= 1
        if self._active == 0 and self._busy_since is not None:
            self._busy_s += self._clock() - self._busy_since
            self._busy_since = None

    def _settle(self) -> bool:
        """True for a call carried over from before the last change of limit."""
        if self._carried_over == 0:
            return False
        self._carried_over -= 1
        if self._carried_over == 0:
            self._busy_s = 0.0
            self._busy_since = self._clock() if self._active else None
        return True

    def _hand_out(self) -> None:
        while self._waiting and self._in_flight < self._limit:
            self._take()
            self._waiting.popleft().set()

    def _measured(self, points_per_s: float) -> None:
        now = self._clock()
        level = self._limit
        known = self._fresh(level, now)
        if known is not None:  # smooth a level measured again while its figure is fresh
            points_per_s = (known + points_per_s) / 2
        self._rates[level] = _Rate(points_per_s, now)
        fresh = {
            other: rate for other in self._rates if (rate := self._fresh(other, now)) is not None
        }
        best = max(fresh, key=fresh.__getitem__)
        enough = fresh[best] * (1 - _MARGIN)
        below = fresh.get(level - 1)
        if points_per_s < enough:
            self._set_limit(level + 1 if best > level else level - 1)  # short of the best
        elif level < self._most and level + 1 not in fresh:
            # One more was not measured lately: the best may be up there, and a level
            # can only count as enough against it once it is known again.
            self._set_limit(level + 1)
        elif below is not None and below >= enough:
            self._set_limit(level - 1)  # one call fewer delivers about as much
        elif level > 1 and below is None:
            self._set_limit(level - 1)  # check that one fewer still costs
        else:
            self._set_limit(level)

    def _fresh(self, level: int, now: float) -> float | None:
        rate = self._rates.get(level)
        if rate is None or now - rate.at > _FRESH_S:
            return None
        return rate.points_per_s

    def _set_limit(self, limit: int) -> None:
        """Move to `limit` and start a new measurement there."""
        if limit != self._limit:
            log.debug(
                "delivery calls in flight: %d, was %d (points/s measured by level: %s)",
                limit,
                self._limit,
                {level: round(rate.points_per_s) for level, rate in sorted(self._rates.items())},
            )
        self._limit = limit
        self._busy_s = 0.0
        self._busy_since = self._clock() if self._active else None
        self._points = 0
        self._calls = 0
        self._carried_over = self._in_flight
        self._hand_out()
