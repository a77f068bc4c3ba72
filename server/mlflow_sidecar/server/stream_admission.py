"""Stream admission: long-lived streaming calls never take the workers unary calls need,
and streams beyond the bound are admitted in the order they came.

grpc's sync server runs every call on one pool of `server.workers` threads, and a
streaming call (StreamMetrics, an upload or download, any server stream) holds its thread
for its whole life, idle or not. Without a bound, as many streams as workers leave a
GetRun queued until one of them ends. This interceptor serves at most
`server.max_streaming_rpcs` streaming calls of the sidecar's services at once. A stream
beyond them waits in line, on its worker, for at most `server.stream_wait_s` (and never
past its deadline); at most `server.max_waiting_streams` wait, so streams, served or
waiting, never hold more than the sum of both, which is below `server.workers`: the other
workers always serve unary calls. A stream that finds the line full, or waited its time
out, is refused with RESOURCE_EXHAUSTED (reason TOO_MANY_STREAMS and a retry hint).

The line is first come, first served: a slot that frees goes to the stream that has
waited longest, and a new stream joins the line behind it while anyone waits. A trainer's
metric stream ends its call every couple of seconds and opens the next at once; with a
plain "refuse when full" such a reopening call would win the freed slot nearly every
time, and a refused stream retrying on a backoff would never get in.

A slot is given back when the call's handler returns, or when the RPC ends however it
ends (cancelled, past its deadline, failed), whichever comes first: the RPC's termination
callback frees it even when grpc never iterates or never closes a server stream's
generator. Health and reflection are not counted (health's Watch does not hold a worker;
reflection calls are short).
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, Protocol

import grpc

from mlflow_sidecar.core.errors import ErrorReason, ResourceExhaustedError
from mlflow_sidecar.server.interceptors import Behavior, CallType, WrappedHandlers

# After a refusal, a client asks again after this: by then a metric stream's window
# (2 s) has likely ended somewhere and the line has moved.
RETRY_AFTER_S = 1.0

# grpc reports "no deadline" as a very large remaining time.
_NO_DEADLINE_S = 10**8


class CallContext(Protocol):
    """What admission needs of a call: its deadline and its end."""

    def time_remaining(self) -> float | None:
        """Seconds until the call's deadline (very large or None without one)."""

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the RPC ends; False (and never run) if it has ended."""


class _Place(enum.Enum):
    WAITING = "waiting"
    SERVED = "served"
    GONE = "gone"


class _Ticket:
    __slots__ = ("place",)

    def __init__(self, place: _Place) -> None:
        self.place = place


class StreamSlots:
    """At most `limit` streaming calls served at once, at most `line` more waiting for a
    slot in arrival order, each for at most `wait_s`; `refused` is called for each call
    turned away."""

    def __init__(
        self,
        limit: int,
        line: int = 0,
        wait_s: float = 0.0,
        refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.limit = limit
        self.line = line
        self.wait_s = wait_s
        self._refused = refused
        self._cond = threading.Condition(threading.Lock())
        self._served = 0
        self._waiting: collections.deque[_Ticket] = collections.deque()

    @property
    def in_use(self) -> int:
        """Streaming calls admitted and not yet ended."""
        return self._served

    @property
    def waiting(self) -> int:
        """Streaming calls waiting in line for a slot."""
        return len(self._waiting)

    def enter(self, method: str, context: CallContext) -> Callable[[], None]:
        """Admit a call of `method`, waiting in line if need be; returns what ends its
        stay (safe to call more than once). Raises ResourceExhaustedError (reason
        TOO_MANY_STREAMS) when the line is full or the wait ran out."""
        ticket = self._join()
        if ticket is None:
            raise self._refusal(method, "and as many wait in line")

        def leave() -> None:
            self._leave(ticket)

        if not context.add_callback(leave):
            leave()  # the RPC has already ended: nothing to serve
            raise self._refusal(method, "and this call ended while it waited")
        if ticket.place is _Place.SERVED:
            return leave
        if self._wait(ticket, self._patience(context)):
            return leave
        ended = ticket.place is _Place.GONE  # by the RPC's end, while it waited
        leave()
        if ended:
            raise self._refusal(method, "and this call ended while it waited")
        raise self._refusal(method, f"and no slot freed within {self.wait_s:g}s")

    def _join(self) -> _Ticket | None:
        with self._cond:
            if self._served < self.limit and not self._waiting:
                self._served += 1
                return _Ticket(_Place.SERVED)
            if len(self._waiting) < self.line:
                ticket = _Ticket(_Place.WAITING)
                self._waiting.append(ticket)
                return ticket
            return None

    def _patience(self, context: CallContext) -> float:
        left = context.time_remaining()
        if left is None or left > _NO_DEADLINE_S:
            return self.wait_s
        return max(0.0, min(self.wait_s, left))

    def _wait(self, ticket: _Ticket, patience_s: float) -> bool:
        """Wait until `ticket` is served (True) or gone, or `patience_s` passed (False)."""
        deadline = time.monotonic() + patience_s
        with self._cond:
            while ticket.place is _Place.WAITING:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return ticket.place is _Place.SERVED

    def _leave(self, ticket: _Ticket) -> None:
        with self._cond:
            place, ticket.place = ticket.place, _Place.GONE
            if place is _Place.WAITING:
                self._waiting.remove(ticket)
            elif place is _Place.SERVED:
                if self._waiting:
                    # The slot passes to the longest waiting call, so that a stream that
                    # ends and at once opens again joins the line behind it.
                    self._waiting.popleft().place = _Place.SERVED
                else:
                    self._served -= 1
            self._cond.notify_all()

    def _refusal(self, method: str, why: str) -> ResourceExhaustedError:
        self._refused()
        return ResourceExhaustedError(
            f"{method} refused: the sidecar serves {self.limit} streaming calls at once"
            f" (server.max_streaming_rpcs) {why} (server.max_waiting_streams,"
            " server.stream_wait_s), so that unary calls never wait behind them; try again"
            " shortly, or raise these limits together with server.workers",
            reason=ErrorReason.TOO_MANY_STREAMS,
            metadata={
                "max_streaming_rpcs": str(self.limit),
                "max_waiting_streams": str(self.line),
            },
            retry_after_s=RETRY_AFTER_S,
        )


class StreamAdmissionInterceptor(grpc.ServerInterceptor):
    """Admits a streaming call of `services` through `slots`; it keeps its slot until its
    handler has returned or the RPC has ended."""

    def __init__(self, slots: StreamSlots, services: Collection[str]) -> None:
        self._slots = slots
        self._services = frozenset(services)
        self._handlers = WrappedHandlers(self._wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if method.lstrip("/").rpartition("/")[0] not in self._services:
            return handler
        return self._handlers.get(handler, method)

    def _wrap(self, behavior: Behavior, call_type: CallType, method: str) -> Behavior:
        if call_type == CallType.UNARY:
            return behavior
        slots = self._slots

        if call_type.streaming_response:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                # A generator: admission waits for grpc's first request of an answer, so a
                # call that ends before that never takes a slot.
                leave = slots.enter(method, context)
                try:
                    yield from behavior(request, context)
                finally:
                    leave()

            return stream

        def client_stream(request: Any, context: grpc.ServicerContext) -> Any:
            leave = slots.enter(method, context)
            try:
                return behavior(request, context)
            finally:
                leave()

        return client_stream
