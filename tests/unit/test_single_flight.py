"""`SingleFlight`: one run of the work per key for concurrent callers, and a waiter that
runs the work again when the run it waited for failed for the running caller alone."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from mlflow_sidecar.server.single_flight import SingleFlight

KEY = "model/1"
# Bounds waits for the other thread: long enough for a loaded machine, short enough that a
# broken flight fails the test instead of hanging it.
PATIENCE_S = 30.0


class LeadersOwnError(Exception):
    """Stands for an error of the caller that ran the work (its deadline passed)."""


class SharedError(Exception):
    """Stands for an error every caller gets (the version does not exist)."""


def wait_for_waiters(flights: SingleFlight[str, str], count: int) -> None:
    """Return once `count` callers wait for the run of KEY in progress."""
    for _ in range(int(PATIENCE_S / 0.001)):
        with flights._lock:
            flight = flights._flights.get(KEY)
            if flight is not None and flight.followers >= count:
                return
        threading.Event().wait(0.001)
    raise AssertionError(f"{count} callers never waited for the run")


def wait_for_run(flights: SingleFlight[str, str]) -> None:
    """Return once a run of KEY is in progress."""
    wait_for_waiters(flights, 0)


def failing_once_waiters_are_in(
    flights: SingleFlight[str, str], waiters: int, error: Exception
) -> Callable[[], str]:
    """Work that fails with `error` once `waiters` callers wait for it."""

    def work() -> str:
        wait_for_waiters(flights, waiters)
        raise error

    return work


def in_thread(call: Callable[[], str]) -> tuple[threading.Thread, list[object]]:
    """Run `call` in a thread; the list gets its result or exception."""
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def join(thread: threading.Thread) -> None:
    thread.join(PATIENCE_S)
    assert not thread.is_alive()


def test_waiters_share_the_result_of_one_run():
    flights: SingleFlight[str, str] = SingleFlight()
    runs: list[str] = []
    release = threading.Event()

    def work() -> str:
        runs.append("run")
        release.wait(PATIENCE_S)
        return "files"

    leader, led = in_thread(lambda: flights.run(KEY, work, lambda v: f"{v} (shared)"))
    waiting = [in_thread(lambda: flights.run(KEY, work, lambda v: v)) for _ in range(2)]
    wait_for_waiters(flights, 2)
    release.set()
    for thread, _ in [(leader, led), *waiting]:
        join(thread)
    assert led == ["files"]
    assert [outcome for _, outcome in waiting] == [["files (shared)"]] * 2
    assert runs == ["run"]


def test_a_waiter_gets_an_error_of_the_run_it_does_not_take_as_the_runners_own():
    flights: SingleFlight[str, str] = SingleFlight()
    error = SharedError("gone")
    work = failing_once_waiters_are_in(flights, 1, error)
    leader, led = in_thread(lambda: flights.run(KEY, work, lambda v: v))
    waiter, waited = in_thread(
        lambda: flights.run(
            KEY, lambda: "never", lambda v: v, run_again=lambda e: isinstance(e, LeadersOwnError)
        )
    )
    join(leader)
    join(waiter)
    assert led == [error]
    assert waited == [error]


def test_a_waiter_runs_the_work_itself_when_the_run_failed_for_its_runner_alone():
    flights: SingleFlight[str, str] = SingleFlight()
    error = LeadersOwnError("the leader's deadline passed")
    work = failing_once_waiters_are_in(flights, 1, error)
    leader, led = in_thread(lambda: flights.run(KEY, work, lambda v: v))
    waiter, waited = in_thread(
        lambda: flights.run(
            KEY, lambda: "files", lambda v: v, run_again=lambda e: isinstance(e, LeadersOwnError)
        )
    )
    join(leader)
    join(waiter)
    assert led == [error]
    assert waited == ["files"]


@pytest.mark.parametrize("waiters", [2, 5])
def test_waiters_that_run_again_share_one_new_run(waiters):
    flights: SingleFlight[str, str] = SingleFlight()
    error = LeadersOwnError("the leader's deadline passed")
    runs: list[str] = []
    lock = threading.Lock()

    def again() -> str:
        with lock:
            runs.append("run")
            first = len(runs) == 1
        if first:
            # The other waiters join this second run before it ends.
            wait_for_waiters(flights, waiters - 1)
        return "files"

    leader, led = in_thread(
        lambda: flights.run(KEY, failing_once_waiters_are_in(flights, waiters, error), lambda v: v)
    )
    others = [
        in_thread(lambda: flights.run(KEY, again, lambda v: v, run_again=lambda e: e is error))
        for _ in range(waiters)
    ]
    join(leader)
    for thread, _ in others:
        join(thread)
    assert led == [error]
    assert [outcome for _, outcome in others] == [["files"]] * waiters
    assert runs == ["run"]


def test_a_waiter_whose_patience_runs_out_leaves_and_gets_no_share():
    flights: SingleFlight[str, str] = SingleFlight()
    release = threading.Event()
    shares: list[str] = []

    def work() -> str:
        release.wait(PATIENCE_S)
        return "files"

    def share(value: str) -> str:
        shares.append(value)
        return value

    leader, led = in_thread(lambda: flights.run(KEY, work, share))
    wait_for_run(flights)
    impatient, waited = in_thread(
        lambda: flights.run(
            KEY,
            lambda: "never",
            share,
            patience_s=lambda: 0.05,
            gave_up=lambda: SharedError("late"),
        )
    )
    join(impatient)
    assert [type(outcome) for outcome in waited] == [SharedError]
    release.set()
    join(leader)
    assert led == ["files"]
    assert shares == []  # nothing made for the caller that left (a lease would leak)


def test_a_waiter_without_gave_up_raises_timeout_error():
    flights: SingleFlight[str, str] = SingleFlight()
    release = threading.Event()
    leader, led = in_thread(lambda: flights.run(KEY, lambda: release.wait(PATIENCE_S) and "x", str))
    wait_for_run(flights)
    impatient = in_thread(lambda: flights.run(KEY, lambda: "never", str, patience_s=lambda: 0))
    join(impatient[0])
    release.set()
    join(leader)
    assert [type(outcome) for outcome in impatient[1]] == [TimeoutError]
    assert led == ["x"]


def test_a_waiter_with_patience_left_still_gets_its_share():
    flights: SingleFlight[str, str] = SingleFlight()
    release = threading.Event()

    def work() -> str:
        release.wait(PATIENCE_S)
        return "files"

    leader, led = in_thread(lambda: flights.run(KEY, work, lambda v: f"{v} (shared)"))
    wait_for_run(flights)
    waiter, waited = in_thread(lambda: flights.run(KEY, work, str, patience_s=lambda: PATIENCE_S))
    wait_for_waiters(flights, 1)
    release.set()
    join(leader)
    join(waiter)
    assert led == ["files"]
    assert waited == ["files (shared)"]
