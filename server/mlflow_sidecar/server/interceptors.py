"""Server interceptors: the access log (outer) and the one error mapping (inner).

The error mapping turns domain errors into status codes and anything unexpected into
INTERNAL with a generic message; the detail goes to the log with the request id.
It also publishes the call's deadline to `call_deadline` for the MLflow gateway.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc

from mlflow_sidecar.client.errors import InternalError, SidecarError
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.disk_full import disk_full_error, is_disk_full
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.request_context import request_id

log = logging.getLogger("mlflow_sidecar.access")
error_log = logging.getLogger("mlflow_sidecar.errors")


# grpc reports "no deadline" as a very large remaining time.
_NO_DEADLINE_S = 10**8

Behavior = Callable[[Any, grpc.ServicerContext], Any]
Wrapper = Callable[[Behavior, bool, str], Behavior]


def _wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any] | None, wrap: Wrapper, method: str
) -> Any:
    if handler is None:
        return None
    for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, attr)
        if behavior is not None:
            streaming_response = attr.endswith("_stream")
            return cast(Any, handler)._replace(**{attr: wrap(behavior, streaming_response, method)})
    return handler


class _WrappedHandlers:
    """Each method's handler, wrapped once rather than on every call.

    A wrapped handler is reused only while the handler underneath is the very same
    object, so a handler made for one call (an auth refusal) is wrapped afresh."""

    def __init__(self, wrap: Wrapper) -> None:
        self._wrap = wrap
        self._by_method: dict[str, tuple[object, Any]] = {}

    def get(self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str) -> Any:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap_handler(handler, self._wrap, method)
        if handler is not None:
            self._by_method[method] = (handler, wrapped)
        return wrapped


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes: the one place that does.

    Calls without a deadline get `default_deadline_s` for the sidecar's own waits
    (MLflow retries, flushes), so nothing waits forever on their behalf.
    """

    def __init__(self, default_deadline_s: float | None = None) -> None:
        self._default_deadline_s = default_deadline_s
        self._handlers = _WrappedHandlers(self._wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return self._handlers.get(continuation(handler_call_details), handler_call_details.method)

    def _wrap(self, behavior: Behavior, streaming_response: bool, method: str) -> Behavior:
        default = self._default_deadline_s

        def remaining(context: grpc.ServicerContext) -> float | None:
            left = context.time_remaining()
            return default if left is None or left > _NO_DEADLINE_S else float(left)

        if streaming_response:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with call_deadline.deadline_scope(remaining(context)):
                    try:
                        yield from behavior(request, context)
                    except Exception as exc:  # noqa: BLE001 - every failure must become a status code
                        _abort(exc, context, method)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            with call_deadline.deadline_scope(remaining(context)):
                try:
                    return behavior(request, context)
                except Exception as exc:  # noqa: BLE001 - every failure must become a status code
                    _abort(exc, context, method)

        return unary


def _status_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    # ServicerContext.code() exists since grpcio 1.38; the type stubs lack it.
    code: grpc.StatusCode | None = cast(Any, context).code()
    return code


def _abort(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    if _status_code(context) is not None:
        # The handler aborted the call itself; keep its status.
        raise exc
    if is_disk_full(exc):
        # Any write path that met a full disk (the request ledger, a staged file): the
        # caller keeps its data and retries, so it is told so rather than INTERNAL.
        exc = disk_full_error("the sidecar could not write to its data dir")
    if isinstance(exc, SidecarError) and not isinstance(exc, InternalError):
        context.abort(exc.code, exc.message)
    rid = request_id.get()
    error_log.error("unexpected error in %s (request %s)", method, rid, exc_info=exc)
    context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (request id {rid}); see the sidecar log"
    )


class AccessLogInterceptor(grpc.ServerInterceptor):
    """One log line per call (method, peer, status code, duration, request id): DEBUG for
    OK so that high call rates stay cheap, WARNING for every failure; and the RPC count and
    latency series."""

    def __init__(self, metrics: SidecarMetrics | None = None) -> None:
        self._metrics = metrics
        self._handlers = _WrappedHandlers(self._wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return self._handlers.get(continuation(handler_call_details), handler_call_details.method)

    def _wrap(self, behavior: Behavior, streaming_response: bool, method: str) -> Behavior:
        metrics = self._metrics

        def finish(context: grpc.ServicerContext, started: float) -> None:
            code = _status_code(context) or grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            elapsed = time.perf_counter() - started
            level = logging.DEBUG if code == grpc.StatusCode.OK else logging.WARNING
            if log.isEnabledFor(level):
                log.log(level, "%s %s %s %.1fms", method, context.peer(), name, elapsed * 1000)
            if metrics is not None:
                metrics.rpc_total.labels(method, name).inc()
                metrics.rpc_seconds.labels(method).observe(elapsed)

        if streaming_response:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                token = request_id.set(uuid.uuid4().hex[:16])
                started = time.perf_counter()
                try:
                    yield from behavior(request, context)
                finally:
                    finish(context, started)
                    request_id.reset(token)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            token = request_id.set(uuid.uuid4().hex[:16])
            started = time.perf_counter()
            try:
                return behavior(request, context)
            finally:
                finish(context, started)
                request_id.reset(token)

        return unary
