"""Retries of the sidecar's unary calls that rides out a sidecar restart.

gRPC's own retry policy sleeps a short random backoff between tries and then tries again
at once, whatever the channel's state: a call made while the channel was still in its
reconnect backoff failed every try within about a second and a half, although the sidecar
was back and serving. Here a try that met an unreachable sidecar is followed by a wait for
the channel to be READY again (it reconnects on its own within its max reconnect backoff),
bounded by the call's deadline, and only then by the next try. A long outage still ends
the call within its deadline, with UNAVAILABLE saying for how long and over how many tries
the sidecar was unreachable.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from mlflow_sidecar.client.call_interceptor import CallDetails, CallInterceptor

# gRFC A6: a reachable server's "do not retry this call" (the sidecar sends -1 once it
# has spent its own MLflow retries).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

# How often a wait for the channel looks whether it was closed meanwhile.
_CLOSED_CHECK_S = 0.25


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """How many tries a unary call gets and how long it pauses between them.

    The pause after a try that found the sidecar reachable (it answered UNAVAILABLE, or
    the connection came back at once) follows gRPC's policy: full jitter over an
    exponential backoff. After a try that found it unreachable the call waits for the
    channel to reconnect instead, as long as its deadline allows."""

    max_attempts: int
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff_s(
        self, retry: int, draw: Callable[[float, float], float] = random.uniform
    ) -> float:
        """The pause before retry number `retry` (1 for the second try)."""
        ceiling = self.initial_backoff_s * self.multiplier ** max(0, retry - 1)
        return draw(0.0, min(self.max_backoff_s, ceiling))

    def may_retry(self, tries: int, remaining_s: float) -> bool:
        """Whether a call that has made `tries` tries, with `remaining_s` left of its
        deadline, tries again."""
        return tries < self.max_attempts and remaining_s > 0


def pushback_refuses(trailing_metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
    """Whether the server asked for no retry (`grpc-retry-pushback-ms` negative or not a
    number, as gRFC A6 reads it)."""
    for key, value in trailing_metadata or ():
        if key == RETRY_PUSHBACK_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                return int(text) < 0
            except ValueError:
                return True
    return False


def unreachable_details(target: str, elapsed_s: float, tries: int, last: str) -> str:
    """The message of the UNAVAILABLE a call ends with once its retries ran out."""
    plural = "try" if tries == 1 else "tries"
    return (
        f"the sidecar at {target} was unreachable for {elapsed_s:.1f} s over {tries}"
        f" {plural}: {last}"
    )


class Reconnect:
    """The wait before the next try of a call that found the sidecar unreachable: for the
    channel to be READY again (it reconnects on its own within its max reconnect backoff),
    bounded by a deadline. A sidecar that was reachable at once (it answered UNAVAILABLE,
    or the connection came back just then) is given the schedule's backoff instead of a
    tight loop. The retries of unary calls and the resends of transfers share it."""

    def __init__(self, channel: grpc.Channel, check_usable: Callable[[], None]) -> None:
        self._channel = channel
        self._check_usable = check_usable

    def pause(self, schedule: RetrySchedule, tries: int, deadline: float) -> bool:
        """Wait before try `tries + 1`; False when `deadline` (`time.monotonic()`) passed
        with the channel still not READY. Raises FailedPreconditionError when the channel
        is closed (or used after fork), before or during the wait: that, not UNAVAILABLE,
        is what the call meets."""
        self._check_usable()
        ready_at_once, ready = _wait_ready(self._channel, deadline, self._check_usable)
        self._check_usable()
        if not ready:
            return False
        if ready_at_once:
            pause = min(schedule.backoff_s(tries), deadline - time.monotonic())
            if pause > 0:
                time.sleep(pause)
        return deadline - time.monotonic() > 0


class UnaryRetry(CallInterceptor):
    """Tries a unary-unary call of the sidecar's services up to `max_attempts` times while
    it fails with UNAVAILABLE, waiting for the channel to reconnect before each retry, all
    within the call's deadline (`default_deadline_s` for a call without one).

    Other kinds of calls pass through: streams are sent again by the typed clients.
    A call made with `.future()` is not retried here, as its outcome is not known yet."""

    def __init__(
        self,
        reconnect: Reconnect,
        *,
        target: str,
        max_attempts: int,
        default_deadline_s: float,
        service_prefix: str = "/mlflow_sidecar.v1.",
    ) -> None:
        self._reconnect = reconnect
        self._target = target
        self._schedule = RetrySchedule(max_attempts)
        self._default_deadline_s = default_deadline_s
        self._prefix = service_prefix

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(details, request)

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        if self._schedule.max_attempts < 2 or not method.startswith(self._prefix):
            return continuation(client_call_details, request)
        return self._with_retries(continuation, client_call_details, request)

    def _with_retries(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        started = time.monotonic()
        budget = details.timeout if details.timeout is not None else self._default_deadline_s
        deadline = started + budget
        tries = 0
        while True:
            tries += 1
            remaining = deadline - time.monotonic()
            # A call without a deadline keeps none on its tries: only the waits are bounded.
            timeout = None if details.timeout is None else max(remaining, 0.0)
            outcome = continuation(_with_timeout(details, timeout), request)
            if not outcome.done():
                return outcome
            error = outcome.exception()
            if not sidecar_unreachable(error):
                return outcome
            if not self._schedule.may_retry(tries, deadline - time.monotonic()):
                break
            if not self._reconnect.pause(self._schedule, tries, deadline):
                break
        return UnreachableError(
            error,
            unreachable_details(
                self._target, time.monotonic() - started, tries, error.details() or ""
            ),
        )


def sidecar_unreachable(error: BaseException | None) -> bool:
    """Whether a failed call met the sidecar unreachable, so that trying again may help:
    UNAVAILABLE without the sidecar's own "do not retry". The sidecar answers UNAVAILABLE
    with that pushback once it has spent its own MLflow retries; trying again would only
    multiply them. The one rule of every retry and resend of the typed client."""
    if not isinstance(error, grpc.RpcError) or not isinstance(error, grpc.Call):
        return False
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return not pushback_refuses(error.trailing_metadata())


def _with_timeout(details: Any, timeout: float | None) -> CallDetails:
    replaced = CallDetails(details, tuple(details.metadata or ()))
    replaced.timeout = timeout
    return replaced


def _wait_ready(
    channel: grpc.Channel, deadline: float, check_usable: Callable[[], None]
) -> tuple[bool, bool]:
    """(READY at the first look, READY before `deadline`): asks the channel to connect and
    watches its state, which gRPC reports first as it is now, then at each change.
    `check_usable` raises once the channel is closed (gRPC then stops reporting)."""
    ready = threading.Event()
    seen: list[grpc.ChannelConnectivity] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        seen.append(state)
        if state == grpc.ChannelConnectivity.READY:
            ready.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        while not ready.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, False
            ready.wait(min(remaining, _CLOSED_CHECK_S))
            if ready.is_set():
                break
            check_usable()
    finally:
        channel.unsubscribe(watch)
    return seen[0] == grpc.ChannelConnectivity.READY, True


class UnreachableError(grpc.RpcError, grpc.Call, grpc.Future):  # type: ignore[type-arg]
    """The failed outcome of a call whose retries ran out: the last try's UNAVAILABLE with
    a message that says how long and over how many tries the sidecar was unreachable."""

    def __init__(self, last: Any, details: str) -> None:
        super().__init__(details)
        self._last = last
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return self._last.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._last.trailing_metadata()

    def debug_error_string(self) -> str:
        return str(self._last.debug_error_string())

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> Exception | None:
        return self

    def traceback(self, timeout: float | None = None) -> Any:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def __str__(self) -> str:
        return f"UNAVAILABLE: {self._details}"
