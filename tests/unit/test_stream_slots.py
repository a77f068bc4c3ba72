"""StreamSlots: at most `limit` streams served, a first-come-first-served line of at most
`line` more, a bounded wait, and no slot kept by a call that ended, however it ended."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from mlflow_sidecar.core.errors import ErrorReason, ResourceExhaustedError
from mlflow_sidecar.server.interceptors import CallType
from mlflow_sidecar.server.stream_admission import (
    RETRY_AFTER_S,
    StreamAdmissionInterceptor,
    StreamSlots,
)

METHOD = "/mlflow_sidecar.v1.ExperimentTrackingService/StreamMetrics"
# Generous: a waiter that should be served gets its slot long before this.
LONG_WAIT_S = 60.0


class FakeCall:
    """A call's context: its deadline, and its end, which runs the callbacks as grpc does."""

    def __init__(self, remaining_s: float | None = None, *, ended: bool = False) -> None:
        self._remaining_s = remaining_s
        self._ended = ended
        self.callbacks: list[Callable[[], None]] = []

    def time_remaining(self) -> float | None:
        return self._remaining_s

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._ended:
            return False
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        """The RPC ends (done, cancelled, past its deadline): grpc runs the callbacks."""
        self._ended = True
        for callback in self.callbacks:
            callback()


class Waiter:
    """A call entering in its own thread, as a worker does."""

    def __init__(self, slots: StreamSlots, call: FakeCall | None = None) -> None:
        self.call = call or FakeCall()
        self.leave: Callable[[], None] | None = None
        self.error: ResourceExhaustedError | None = None
        self._thread = threading.Thread(target=self._enter, args=(slots,), daemon=True)
        self._thread.start()

    def _enter(self, slots: StreamSlots) -> None:
        try:
            self.leave = slots.enter(METHOD, self.call)
        except ResourceExhaustedError as exc:
            self.error = exc

    def result(self) -> Callable[[], None]:
        """The call's leave once it was admitted; fails if it was refused."""
        self._thread.join(LONG_WAIT_S)
        assert not self._thread.is_alive(), "still waiting"
        assert self.error is None, self.error
        assert self.leave is not None
        return self.leave

    def refusal(self) -> ResourceExhaustedError:
        self._thread.join(LONG_WAIT_S)
        assert not self._thread.is_alive(), "still waiting"
        assert self.error is not None
        return self.error


def wait_for_line(slots: StreamSlots, length: int) -> None:
    """Until `length` calls wait in line (each waiter joins in its own thread)."""
    give_up = time.monotonic() + LONG_WAIT_S
    while slots.waiting != length:
        assert time.monotonic() < give_up, f"{slots.waiting} calls wait, not {length}"
        time.sleep(0.005)


def test_calls_up_to_the_limit_are_served_at_once_and_free_their_slot_on_leaving() -> None:
    slots = StreamSlots(2, line=0)
    first = slots.enter(METHOD, FakeCall())
    second = slots.enter(METHOD, FakeCall())
    assert slots.in_use == 2
    first()
    assert slots.in_use == 1
    second()
    assert slots.in_use == 0


def test_with_no_line_one_more_is_refused_at_once_with_the_reason_and_a_hint() -> None:
    refused: list[int] = []
    slots = StreamSlots(1, line=0, wait_s=LONG_WAIT_S, refused=lambda: refused.append(1))
    slots.enter(METHOD, FakeCall())
    with pytest.raises(ResourceExhaustedError) as error:
        slots.enter(METHOD, FakeCall())
    assert error.value.reason == ErrorReason.TOO_MANY_STREAMS
    assert error.value.retry_after_s == RETRY_AFTER_S
    assert error.value.metadata == {"max_streaming_rpcs": "1", "max_waiting_streams": "0"}
    assert "server.max_streaming_rpcs" in error.value.message
    assert refused == [1]
    assert (slots.in_use, slots.waiting) == (1, 0)


def test_a_full_line_refuses_the_next_call_at_once() -> None:
    slots = StreamSlots(1, line=1, wait_s=LONG_WAIT_S)
    served = slots.enter(METHOD, FakeCall())
    waiter = Waiter(slots)
    wait_for_line(slots, 1)
    with pytest.raises(ResourceExhaustedError) as error:
        slots.enter(METHOD, FakeCall())
    assert error.value.reason == ErrorReason.TOO_MANY_STREAMS
    served()
    waiter.result()()
    assert (slots.in_use, slots.waiting) == (0, 0)


def test_a_freed_slot_goes_to_the_longest_waiting_call_not_to_one_that_comes_later() -> None:
    slots = StreamSlots(1, line=3, wait_s=LONG_WAIT_S)
    served = slots.enter(METHOD, FakeCall())
    first = Waiter(slots)
    wait_for_line(slots, 1)
    second = Waiter(slots)
    wait_for_line(slots, 2)
    # The served call ends and opens again at once, as a metric stream's next window does.
    served()
    reopened = Waiter(slots)
    leave_first = first.result()
    wait_for_line(slots, 2)  # the second, then the reopened call
    assert slots.in_use == 1
    leave_first()
    leave_second = second.result()
    assert slots.waiting == 1
    leave_second()
    reopened.result()()
    assert (slots.in_use, slots.waiting) == (0, 0)


def test_a_call_that_waited_its_time_out_is_refused_and_leaves_the_line() -> None:
    slots = StreamSlots(1, line=1, wait_s=0.01)
    served = slots.enter(METHOD, FakeCall())
    refusal = Waiter(slots).refusal()
    assert refusal.reason == ErrorReason.TOO_MANY_STREAMS
    assert "server.stream_wait_s" in refusal.message
    assert (slots.in_use, slots.waiting) == (1, 0)
    served()
    assert slots.in_use == 0


def test_the_wait_never_outlasts_the_calls_deadline() -> None:
    slots = StreamSlots(1, line=1, wait_s=LONG_WAIT_S * 100)
    slots.enter(METHOD, FakeCall())
    # Past its deadline already: the line is left at once instead of after wait_s.
    assert Waiter(slots, FakeCall(remaining_s=0.0)).refusal().reason == (
        ErrorReason.TOO_MANY_STREAMS
    )
    assert slots.waiting == 0


def test_a_call_that_ends_while_it_waits_leaves_the_line() -> None:
    slots = StreamSlots(1, line=2, wait_s=LONG_WAIT_S)
    served = slots.enter(METHOD, FakeCall())
    cancelled = Waiter(slots)
    wait_for_line(slots, 1)
    cancelled.call.end()  # cancelled by its client, or past its deadline
    assert "ended while it waited" in cancelled.refusal().message
    assert slots.waiting == 0
    served()
    assert slots.in_use == 0


def test_an_rpc_that_ended_before_admission_takes_no_slot() -> None:
    slots = StreamSlots(1, line=1)
    with pytest.raises(ResourceExhaustedError):
        slots.enter(METHOD, FakeCall(ended=True))
    assert (slots.in_use, slots.waiting) == (0, 0)


def test_the_rpcs_end_frees_the_slot_even_if_the_handler_never_returns() -> None:
    # A server stream's generator that grpc stops iterating and nobody closes.
    slots = StreamSlots(1, line=0)
    call = FakeCall()
    slots.enter(METHOD, call)
    call.end()
    assert slots.in_use == 0


def test_leaving_twice_frees_one_slot_only() -> None:
    slots = StreamSlots(2, line=0)
    call = FakeCall()
    leave = slots.enter(METHOD, call)
    other = slots.enter(METHOD, FakeCall())
    leave()  # the handler returned
    call.end()  # then the RPC ended
    leave()
    assert slots.in_use == 1
    other()
    assert slots.in_use == 0


def test_a_waiter_served_by_a_slot_that_ends_by_the_rpcs_end_gets_it() -> None:
    slots = StreamSlots(1, line=1, wait_s=LONG_WAIT_S)
    call = FakeCall()
    slots.enter(METHOD, call)
    waiter = Waiter(slots)
    wait_for_line(slots, 1)
    call.end()
    leave = waiter.result()
    assert (slots.in_use, slots.waiting) == (1, 0)
    waiter.call.end()
    leave()
    assert slots.in_use == 0


# -- the interceptor's wrappers: every way a handler ends gives the slot back ------------


class Context(FakeCall):
    """FakeCall as a grpc.ServicerContext for the wrapped behaviors."""


def wrapped(slots: StreamSlots, behavior: Callable[..., object], call_type: CallType) -> object:
    interceptor = StreamAdmissionInterceptor(slots, ["svc"])
    return interceptor._wrap(behavior, call_type, METHOD)


def test_a_client_stream_handler_that_returns_or_raises_gives_its_slot_back() -> None:
    slots = StreamSlots(1, line=0)

    def fails(request: object, context: grpc.ServicerContext) -> object:
        assert slots.in_use == 1
        raise ValueError("bad input")

    def answers(request: object, context: grpc.ServicerContext) -> object:
        assert slots.in_use == 1
        return "answer"

    for behavior in (fails, answers):
        handler = wrapped(slots, behavior, CallType.CLIENT_STREAM)
        with contextlib.suppress(ValueError):
            handler(iter(()), Context())  # type: ignore[operator]
        assert slots.in_use == 0


def test_a_server_stream_takes_its_slot_when_iterated_and_gives_it_back_however_it_ends() -> None:
    slots = StreamSlots(1, line=0)

    def answers(request: object, context: grpc.ServicerContext) -> Iterator[str]:
        assert slots.in_use == 1
        yield "a"
        yield "b"

    def fails(request: object, context: grpc.ServicerContext) -> Iterator[str]:
        yield "a"
        raise ValueError("failed midway")

    handler = wrapped(slots, answers, CallType.SERVER_STREAM)
    never_iterated = handler(None, Context())  # type: ignore[operator]
    assert slots.in_use == 0
    del never_iterated
    assert list(handler(None, Context())) == ["a", "b"]  # type: ignore[operator]
    assert slots.in_use == 0

    failing = wrapped(slots, fails, CallType.SERVER_STREAM)
    with pytest.raises(ValueError):
        list(failing(None, Context()))  # type: ignore[operator]
    assert slots.in_use == 0

    # Abandoned after its first answer (the client cancelled): closed, or ended by the RPC.
    context = Context()
    abandoned = wrapped(slots, answers, CallType.SERVER_STREAM)(None, context)  # type: ignore[operator]
    assert next(abandoned) == "a"
    assert slots.in_use == 1
    context.end()
    assert slots.in_use == 0
    abandoned.close()
    assert slots.in_use == 0


def test_unary_calls_are_not_admitted_at_all() -> None:
    slots = StreamSlots(1, line=0)
    slots.enter(METHOD, FakeCall())

    def answers(request: object, context: grpc.ServicerContext) -> str:
        return "answer"

    assert wrapped(slots, answers, CallType.UNARY)("request", Context()) == "answer"  # type: ignore[operator]
