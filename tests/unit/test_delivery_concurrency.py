"""How many log_batch calls the deliverer keeps in flight: one for a server that takes one
write at a time, all of them for one that takes them side by side, the knee for one in
between (the fewest calls within a margin of the best, however small each step); measured
again as the server changes, halved when MLflow pushes back; slots handed out in turn and
never more than the limit."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable

import pytest

from mlflow_sidecar.server.spool.delivery_concurrency import DeliveryConcurrency

# Simulated time a round of calls takes: four rounds make one measurement.
ROUND_S = 0.25
# Only a safety net for a broken limiter: no test waits this long when it passes.
HANG_S = 30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Server = Callable[[int, float], float]
"""Points per second a simulated MLflow delivers with `calls` in flight at time `t`."""


def serial(calls: int, t: float) -> float:
    # One write at a time; the waiting calls cost it a little (lock polling).
    return 4000.0 / (1 + 0.1 * (calls - 1))


def parallel(calls: int, t: float) -> float:
    return 3000.0 * calls


def knee_at_two(calls: int, t: float) -> float:
    return 3000.0 * min(calls, 2)


def drive(limit: DeliveryConcurrency, clock: Clock, server: Server, seconds: float) -> Counter[int]:
    """Rounds of as many calls as the limit allows, each round ROUND_S long and sharing
    the points the server delivers in it; returns the seconds spent at each limit."""
    spent: Counter[int] = Counter()
    end = clock.now + seconds
    while clock.now < end:
        calls = 0
        while limit.try_acquire():
            calls += 1
        assert calls == limit.limit
        points = server(calls, clock.now) * ROUND_S
        clock.now += ROUND_S
        spent[calls] += 1
        for _ in range(calls):
            limit.sent(round(points / calls))
    return Counter({calls: rounds * ROUND_S for calls, rounds in spent.items()})


def test_a_server_that_takes_one_write_at_a_time_gets_one_call() -> None:
    clock = Clock()
    limit = DeliveryConcurrency(4, clock=clock)

    settling = drive(limit, clock, serial, 10)
    assert limit.limit == 1, settling
    spent = drive(limit, clock, serial, 120)
    # It checks two calls again about every minute, and goes back to one.
    assert spent[1] >= 0.9 * 120, spent
    assert set(spent) == {1, 2}, spent


def test_a_server_that_takes_calls_side_by_side_gets_them_all() -> None:
    clock = Clock()
    limit = DeliveryConcurrency(4, clock=clock)

    spent = drive(limit, clock, parallel, 120)
    assert spent[4] >= 0.9 * 120, spent
    assert min(spent) == 3, spent
    assert limit.limit == 4


def test_the_limit_settles_where_more_calls_stop_paying() -> None:
    clock = Clock()
    limit = DeliveryConcurrency(8, clock=clock)

    drive(limit, clock, knee_at_two, 20)
    spent = drive(limit, clock, knee_at_two, 120)
    assert spent[2] >= 0.8 * 120, spent
    assert limit.limit == 2


def small_steps(calls: int, t: float) -> float:
    # Each call past the second adds 4 %: less than the margin alone, 8 % together.
    return 6000.0 if calls == 1 else 10000.0 * 1.04 ** (calls - 2)


def test_steps_that_each_add_little_are_kept_when_together_they_pay() -> None:
    clock = Clock()
    limit = DeliveryConcurrency(4, clock=clock)

    drive(limit, clock, small_steps, 20)
    spent = drive(limit, clock, small_steps, 120)
    # Three calls deliver within the margin of four; two fall 8 % short of them.
    assert spent[3] + spent[4] >= 0.9 * 120, spent
    assert limit.limit in (3, 4)


def test_a_workers_own_time_between_calls_counts_as_delivery_time() -> None:
    # Each call takes longer the more there are (no gain while they are in flight), but a
    # worker spends 0.5 s of its own between rounds (reading, deleting): more calls a
    # round deliver more points a second, and the limit must see it.
    clock = Clock()
    limit = DeliveryConcurrency(4, clock=clock)
    spent: Counter[int] = Counter()
    end = clock.now + 120
    while clock.now < end:
        with limit.working():
            calls = 0
            while limit.try_acquire():
                calls += 1
            clock.now += 0.1 * calls
            for _ in range(calls):
                limit.sent(100)
            clock.now += 0.5
        spent[calls] += 1
    assert spent.most_common(1)[0][0] == 4, spent
    assert limit.limit == 4


def test_a_limit_of_one_stays_one() -> None:
    clock = Clock()
    limit = DeliveryConcurrency(1, clock=clock)

    spent = drive(limit, clock, parallel, 60)
    assert set(spent) == {1}


def test_the_limit_follows_a_server_that_changes() -> None:
    clock = Clock()
    limit = DeliveryConcurrency(4, clock=clock)
    switch = clock.now + 60

    def scales_then_serialises(calls: int, t: float) -> float:
        return parallel(calls, t) if t < switch else serial(calls, t)

    drive(limit, clock, scales_then_serialises, 60)
    assert limit.limit == 4
    # Within a measurement's freshness and the steps down, one call again.
    drive(limit, clock, scales_then_serialises, 60)
    spent = drive(limit, clock, scales_then_serialises, 60)
    assert limit.limit == 1
    assert spent[1] >= 0.8 * 60, spent

    def serialises_then_scales(calls: int, t: float) -> float:
        return serial(calls, t) if t < switch + 180 else parallel(calls, t)

    drive(limit, clock, serialises_then_scales, 120)
    spent = drive(limit, clock, serialises_then_scales, 60)
    assert spent[4] >= 0.8 * 60, spent


@pytest.mark.parametrize("seed", range(5))
def test_noisy_measurements_keep_the_limit_near_what_pays(seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()

    def noisy(server: Server) -> Server:
        return lambda calls, t: server(calls, t) * rng.uniform(0.85, 1.15)

    scaling = DeliveryConcurrency(4, clock=clock)
    spent = drive(scaling, clock, noisy(parallel), 300)
    assert spent[4] + spent[3] >= 0.8 * 300, spent

    serialising = DeliveryConcurrency(4, clock=clock)
    drive(serialising, clock, noisy(serial), 20)
    spent = drive(serialising, clock, noisy(serial), 300)
    assert spent[1] + spent[2] >= 0.8 * 300, spent


def test_a_push_back_halves_the_limit() -> None:
    clock = Clock()
    limit = DeliveryConcurrency(8, clock=clock)
    for expected in (4, 2, 1, 1):
        assert limit.try_acquire()
        limit.sent(0, pushed_back=True)
        assert limit.limit == expected


def test_calls_pushed_back_together_halve_the_limit_once() -> None:
    limit = DeliveryConcurrency(8)
    for _ in range(8):
        assert limit.try_acquire()
    for _ in range(8):
        limit.sent(0, pushed_back=True)
    assert limit.limit == 4
    # A push-back on a call sent after the change is news: it halves again.
    assert limit.try_acquire()
    limit.sent(0, pushed_back=True)
    assert limit.limit == 2


def test_slots_never_exceed_the_limit_and_a_lower_limit_waits_for_calls_to_end() -> None:
    clock = Clock()
    limit = DeliveryConcurrency(4, clock=clock)
    for _ in range(4):
        assert limit.try_acquire()
    assert not limit.try_acquire()

    limit.sent(0, pushed_back=True)  # limit 2, three still in flight
    assert limit.limit == 2
    assert not limit.try_acquire()
    limit.release()
    assert not limit.try_acquire()  # two in flight: the limit
    limit.release()
    assert limit.try_acquire()


def test_slots_go_to_waiting_workers_in_turn() -> None:
    limit = DeliveryConcurrency(1)
    assert limit.try_acquire()
    order: list[int] = []

    def worker(index: int, ready: threading.Event) -> None:
        ready.set()
        assert limit.acquire()
        order.append(index)
        limit.release()

    threads = []
    for index in range(3):
        ready = threading.Event()
        thread = threading.Thread(target=worker, args=(index, ready))
        thread.start()
        assert ready.wait(HANG_S)
        # The worker is in line once the limiter has queued it.
        while len(limit._waiting) < index + 1:
            threading.Event().wait(0.001)
        threads.append(thread)
    limit.release()
    for thread in threads:
        thread.join(HANG_S)
    assert order == [0, 1, 2]


def test_a_stopped_worker_leaves_the_line_without_a_slot() -> None:
    limit = DeliveryConcurrency(1)
    assert limit.try_acquire()
    stop = threading.Event()
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(limit.acquire(stop)))
    thread.start()
    stop.set()
    thread.join(HANG_S)
    assert got == [False]
    limit.release()
    # The slot it did not take is free, and nobody is left in line for it.
    assert limit.try_acquire()


def test_at_least_one_call_is_allowed() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DeliveryConcurrency(0)
