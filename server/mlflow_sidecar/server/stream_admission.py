"""Stream admission: long-lived streaming calls never take the workers unary calls need.

grpc's sync server runs every call on one pool of `server.workers` threads, and a
streaming call (StreamMetrics, an upload or download) holds its thread for its whole life,
idle or not. Without a bound, as many streams as workers leave a GetRun queued until one
of them ends. This interceptor admits at most `server.max_streaming_rpcs` streaming calls
of the sidecar's services at once, so the other workers always serve unary calls. A
stream beyond the bound is refused at once, before any of its messages is read, with
RESOURCE_EXHAUSTED (reason TOO_MANY_STREAMS and a retry hint): waiting for a slot would
itself hold a worker. Health and reflection are not counted (health's Watch does not hold
a worker; reflection calls are short).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator
from typing import Any

import grpc

from mlflow_sidecar.core.errors import ErrorReason, ResourceExhaustedError
from mlflow_sidecar.server.interceptors import Behavior, CallType, WrappedHandlers

# A metric stream's call lasts a couple of seconds, a transfer longer: a slot is likely
# free again within this.
RETRY_AFTER_S = 1.0


class StreamSlots:
    """At most `limit` streaming calls at once; `refused` is called for each one refused."""

    def __init__(self, limit: int, refused: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self._refused = refused
        self._lock = threading.Lock()
        self._in_use = 0

    @property
    def in_use(self) -> int:
        """Streaming calls admitted and not yet finished."""
        return self._in_use

    def take(self, method: str) -> None:
        """Take a slot for a call of `method`, or raise ResourceExhaustedError at once."""
        with self._lock:
            admitted = self._in_use < self.limit
            if admitted:
                self._in_use += 1
        if admitted:
            return
        self._refused()
        raise ResourceExhaustedError(
            f"{method} refused: the sidecar serves {self.limit} streaming calls at once"
            " (server.max_streaming_rpcs), so that unary calls never wait behind them;"
            " try again shortly, or raise server.max_streaming_rpcs together with"
            " server.workers",
            reason=ErrorReason.TOO_MANY_STREAMS,
            metadata={"max_streaming_rpcs": str(self.limit)},
            retry_after_s=RETRY_AFTER_S,
        )

    def give_back(self) -> None:
        """Free the slot of a call that has ended."""
        with self._lock:
            self._in_use -= 1


class StreamAdmissionInterceptor(grpc.ServerInterceptor):
    """Admits a streaming call of `services` only while a slot of `slots` is free; it
    keeps the slot until its handler has returned (the worker is free again then)."""

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
                slots.take(method)
                try:
                    yield from behavior(request, context)
                finally:
                    slots.give_back()

            return stream

        def client_stream(request: Any, context: grpc.ServicerContext) -> Any:
            slots.take(method)
            try:
                return behavior(request, context)
            finally:
                slots.give_back()

        return client_stream
