"""Server interceptors: the access log and RPC metrics (outer) and the one error mapping
(inner).

The error mapping turns domain errors into status codes with `google.rpc.Status`
details (AIP-193) and anything unexpected into INTERNAL with a generic message; the
detail goes to the log with the request id. It also publishes the call's deadline to
`call_deadline` for the MLflow gateway.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc
from grpc_status import rpc_status

from mlflow_sidecar.core.errors import (
    REQUEST_ID_KEY,
    CancelledError,
    ErrorReason,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    SidecarError,
    error_from_status,
    to_rpc_status,
)
from mlflow_sidecar.core.str_enum import StrEnum
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.answer_bulk import leave_out_bulk
from mlflow_sidecar.server.call_drain import CallDrain
from mlflow_sidecar.server.disk_full import disk_full_error, is_disk_full
from mlflow_sidecar.server.observability import CLIENT_CAUSED_CODES, MethodSeries, SidecarMetrics
from mlflow_sidecar.server.open_files import is_out_of_files, open_files_error
from mlflow_sidecar.server.request_context import request_id

log = logging.getLogger("mlflow_sidecar.access")
_notes = logging.getLogger(__name__)
error_log = logging.getLogger("mlflow_sidecar.errors")


# grpc reports "no deadline" as a very large remaining time.
_NO_DEADLINE_S = 10**8

Behavior = Callable[[Any, grpc.ServicerContext], Any]


class CallType(StrEnum):
    """A method's shape, named as the standard gRPC metrics' `grpc_type` label names it."""

    UNARY = "unary"
    CLIENT_STREAM = "client_stream"
    SERVER_STREAM = "server_stream"
    BIDI_STREAM = "bidi_stream"

    @property
    def streaming_response(self) -> bool:
        """True when the method answers with a stream of messages."""
        return self in (CallType.SERVER_STREAM, CallType.BIDI_STREAM)

    @property
    def streaming_request(self) -> bool:
        """True when the method takes a stream of messages."""
        return self in (CallType.CLIENT_STREAM, CallType.BIDI_STREAM)


Wrapper = Callable[[Behavior, CallType, str], Behavior]

_HANDLER_ATTRS = (
    ("unary_unary", CallType.UNARY),
    ("unary_stream", CallType.SERVER_STREAM),
    ("stream_unary", CallType.CLIENT_STREAM),
    ("stream_stream", CallType.BIDI_STREAM),
)


def _wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any] | None, wrap: Wrapper, method: str
) -> Any:
    if handler is None:
        return None
    for attr, call_type in _HANDLER_ATTRS:
        behavior = getattr(handler, attr)
        if behavior is not None:
            if getattr(behavior, "experimental_non_blocking", False):
                # grpc.health's Watch sends its answers from callbacks and holds no worker
                # while it waits, but only unwrapped: a wrapper would make it a blocking
                # generator, and every unauthenticated Watch would hold a worker for good.
                return handler
            return cast(Any, handler)._replace(**{attr: wrap(behavior, call_type, method)})
    return handler


class WrappedHandlers:
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
    (MLflow retries, flushes), so nothing waits forever on their behalf. An answer over
    `max_answer_bytes` (the server's send limit) is refused here, with its reason, rather
    than by grpc, which ends the call with a bare RESOURCE_EXHAUSTED after the access log
    has counted it OK.
    """

    def __init__(
        self, default_deadline_s: float | None = None, max_answer_bytes: int | None = None
    ) -> None:
        self._default_deadline_s = default_deadline_s
        self._max_answer_bytes = max_answer_bytes
        self._handlers = WrappedHandlers(self._wrap)
        # method -> (the wrapped handler, the same decoding requests tolerantly)
        self._decoding: dict[str, tuple[object, Any]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        wrapped = self._handlers.get(handler, method)
        if wrapped is handler or wrapped is None or wrapped.request_deserializer is None:
            return wrapped
        cached = self._decoding.get(method)
        if cached is not None and cached[0] is wrapped:
            return cached[1]
        # grpc answers a request it cannot decode with INTERNAL and no details; decoded
        # here, it becomes INVALID_ARGUMENT like any other bad input.
        decoding = wrapped._replace(request_deserializer=_tolerant(wrapped.request_deserializer))
        self._decoding[method] = (wrapped, decoding)
        return decoding

    def _wrap(self, behavior: Behavior, call_type: CallType, method: str) -> Behavior:
        default = self._default_deadline_s
        fits = _answer_limit(self._max_answer_bytes, method.rsplit("/", 1)[-1])

        def remaining(context: grpc.ServicerContext) -> float | None:
            left = context.time_remaining()
            return default if left is None or left > _NO_DEADLINE_S else float(left)

        def scope(context: grpc.ServicerContext) -> Any:
            ended = threading.Event()
            if not context.add_callback(ended.set):
                ended.set()  # already over
            return call_deadline.deadline_scope(remaining(context), ended)

        def decoded(request: Any) -> Any:
            if call_type.streaming_request:
                return (_decoded(message, method) for message in request)
            return _decoded(request, method)

        if call_type.streaming_response:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with scope(context):
                    answers = None
                    try:
                        answers = behavior(decoded(request), context)
                        for answer in answers:
                            yield fits(answer)
                    except Exception as exc:  # noqa: BLE001 - every failure must become a status code
                        _abort(exc, context, method)
                    finally:
                        # A cancelled call closes this generator; the handler's must be
                        # closed with it, now, so that its leases and slots are given back.
                        close = getattr(answers, "close", None)
                        if close is not None:
                            close()

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            with scope(context):
                try:
                    return fits(behavior(decoded(request), context))
                except Exception as exc:  # noqa: BLE001 - every failure must become a status code
                    _abort(exc, context, method)

        return unary


# Methods whose answer is built once their change has taken effect, around the entity they
# changed: an entity too large to send comes without its bulk (`answer_bulk`),
# because an error would tell the caller that nothing happened (and its retry would meet
# the same answer).
_ANSWERS_AFTER_EFFECT = frozenset(
    {
        "CreateExperiment",
        "RestoreExperiment",
        "StartRun",
        "EndRun",
        "RestoreRun",
        "ResumeRun",
        "CreateLoggedModel",
        "FinalizeLoggedModel",
        "CreateRegisteredModel",
        "UpdateRegisteredModel",
        "RenameRegisteredModel",
        "CreateModelVersion",
        "UploadModel",
        "UpdateModelVersion",
    }
)


def _answer_limit(max_bytes: int | None, method_name: str = "") -> Callable[[Any], Any]:
    """The check of one answer message against the server's send limit."""

    def fits(answer: Any) -> Any:
        size = answer.ByteSize() if max_bytes is not None else 0
        if max_bytes is not None and size > max_bytes and method_name in _ANSWERS_AFTER_EFFECT:
            cleared = leave_out_bulk(answer, max_bytes)
            _notes.info(
                "%s took effect; its answer leaves out %s: the whole answer is %d bytes, over"
                " server.max_message_bytes (%d)",
                method_name,
                ", ".join(cleared),
                size,
                max_bytes,
            )
            size = answer.ByteSize()
        if max_bytes is not None and size > max_bytes:
            raise ResourceExhaustedError(
                f"the answer is {size} bytes, over the sidecar's message limit of {max_bytes}"
                " (server.max_message_bytes): ask for less (a smaller page_size), or raise"
                " server.max_message_bytes and the client's max_message_bytes",
                reason=ErrorReason.ANSWER_TOO_LARGE,
                metadata={"answer_bytes": str(size), "max_message_bytes": str(max_bytes)},
            )
        return answer

    return fits


class _Undecodable:
    """A request message that its bytes did not decode to, and why."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserialize` returning `_Undecodable` instead of raising, so that the call's
    behavior, inside the error mapping, refuses it."""

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the request's fault
            return _Undecodable(exc)

    return decode


def _decoded(request: Any, method: str) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgumentError(
            "",
            f"the request is not a valid {method.rsplit('/', 1)[-1]} request message"
            f" ({request.error}); strings must be UTF-8",
        )
    return request


def status_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status code the call has been given so far (None while it has none)."""
    # ServicerContext.code() exists since grpcio 1.38; the type stubs lack it.
    code: grpc.StatusCode | None = cast(Any, context).code()
    return code


# The client's clock runs out first: the server's deadline starts when the request
# arrives, so the client's cancel for a passed deadline reaches the server while the
# server's own deadline is still ahead by the request's transit and queueing time. A
# call that ended that close to its deadline ended because of it.
_DEADLINE_SLACK_S = 1.0


def _ended_without_a_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The outcome of a call whose handler set no code: OK while the call is still live; a
    call grpc already ended (the client cancelled it, or its deadline passed) never
    delivered an OK, and the client saw CANCELLED or DEADLINE_EXCEEDED."""
    if context.is_active():
        return grpc.StatusCode.OK
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


# gRFC A6: a negative pushback tells the client's retry policy not to retry this call.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
_NO_RETRY: tuple[str, str] = (RETRY_PUSHBACK_KEY, "-1")


class _Status(grpc.Status):
    """A `grpc.Status` to end a call with (grpc's own class for it is private)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def abort_with_error(context: grpc.ServicerContext, error: SidecarError) -> NoReturn:
    """End the call with `error`'s status code and its `google.rpc.Status` details.

    Trailing metadata the handler has set (StreamMetrics' `accepted-points`) is kept:
    `abort_with_status` would otherwise replace it. An UNAVAILABLE answer carries
    `grpc-retry-pushback-ms: -1`: the sidecar has already retried MLflow within the
    call's budget, so the client's retry policy must not multiply that by its own.
    """
    status = to_rpc_status(error)
    kept = tuple(
        (key, value)
        for key, value in cast(Any, context).trailing_metadata() or ()
        if key not in (rpc_status.GRPC_DETAILS_METADATA_KEY, RETRY_PUSHBACK_KEY)
    )
    extra = (_NO_RETRY,) if error.code == grpc.StatusCode.UNAVAILABLE else ()
    details = (rpc_status.GRPC_DETAILS_METADATA_KEY, status.SerializeToString())
    context.abort_with_status(_Status(error.code, status.message, (*kept, *extra, details)))
    raise AssertionError("abort_with_status returned")  # it always raises


def _abort(exc: Exception, context: grpc.ServicerContext, method: str) -> NoReturn:
    code = status_code(context)
    if code is not None and not isinstance(exc, SidecarError):
        # The handler set a status itself and failed (e.g. the generated base servicer's
        # UNIMPLEMENTED): report that status, with details, like every other error.
        message = cast(Any, context).details() or code.name
        if isinstance(message, bytes):
            message = message.decode(errors="replace")
        exc = error_from_status(code, message)
    elif is_disk_full(exc):
        # Any write path that met a full disk (the request ledger, a staged file): the
        # caller keeps its data and retries, so it is told so rather than INTERNAL.
        exc = disk_full_error("the sidecar could not write to its data dir")
    elif is_out_of_files(exc):
        exc = open_files_error(method)
    if isinstance(exc, SidecarError) and not isinstance(exc, InternalError):
        abort_with_error(context, exc)
    rid = request_id.get()
    if not context.is_active():
        # grpc ended the call (cancelled, deadline passed) and released what it held,
        # e.g. the MLflow response a download was reading: what fails afterwards is that
        # ending's doing, and nobody is left to answer.
        error_log.debug(
            "%s: the client left the call (cancelled it, or its deadline passed) and the"
            " handler failed after (request %s)",
            method,
            rid,
            exc_info=exc,
        )
        abort_with_error(context, CancelledError("the client left the call"))
    error_log.error("unexpected error in %s (request %s)", method, rid, exc_info=exc)
    abort_with_error(
        context,
        InternalError(
            f"internal error (request id {rid}); see the sidecar log",
            metadata={REQUEST_ID_KEY: rid},
        ),
    )


REQUEST_ID_METADATA = "x-request-id"
# A caller's id is taken as it is when it is short and plain; anything else is replaced,
# so that a log line cannot be forged or bloated through it.
_CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def call_request_id(context: grpc.ServicerContext) -> str:
    """The caller's `x-request-id`, or a fresh id when it sent none (or an unusable one)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str):
            if _CALLER_REQUEST_ID.fullmatch(value):
                return value
            break
    return uuid.uuid4().hex[:16]


def _add_trailing(context: grpc.ServicerContext, key: str, value: str) -> None:
    # Kept with what the handler or the error mapping set (`accepted-points`, the status
    # details): set_trailing_metadata replaces the whole set.
    kept = tuple((k, v) for k, v in cast(Any, context).trailing_metadata() or () if k != key)
    context.set_trailing_metadata((*kept, (key, value)))


def _outcome(context: grpc.ServicerContext, drain: CallDrain) -> tuple[grpc.StatusCode, bool]:
    """The code the client saw, and whether the shutdown cut the call off."""
    if drain.was_cut(context):
        # grpc answered UNAVAILABLE, whatever the handler made of the cancel afterwards
        # (its client leaving, or a request stream that ended too soon).
        return grpc.StatusCode.UNAVAILABLE, True
    return code_the_client_saw(context), False


def code_the_client_saw(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The call's code as its client saw it, for the access log, the metrics and the
    call's span alike."""
    if not context.is_active():
        # grpc ended the call (its client cancelled, or its deadline passed): that is what
        # the client saw, whatever code the handler set when its stream stopped short.
        return _ended_without_a_code(context)
    return status_code(context) or grpc.StatusCode.OK


def _access_level(code: grpc.StatusCode) -> int:
    if code == grpc.StatusCode.OK:
        return logging.DEBUG  # high call rates stay cheap
    if code in CLIENT_CAUSED_CODES:
        return logging.INFO
    return logging.WARNING


def _counted(messages: Iterator[Any], counter: Any) -> Iterator[Any]:
    for message in messages:
        counter.inc()
        yield message


@dataclass(frozen=True)
class _Call:
    """What the access line of a call needs from its start."""

    request_id: str
    peer: str
    started: float


class AccessLogInterceptor(grpc.ServerInterceptor):
    """One log line per call and the standard gRPC server metrics.

    Each call gets a request id: the caller's `x-request-id` metadata, or a fresh one. It
    is in every log record of the call, returned in the trailing metadata as
    `x-request-id`, and named in INTERNAL errors. The line is DEBUG for OK (so high call
    rates stay cheap), INFO for outcomes the caller caused (NOT_FOUND, INVALID_ARGUMENT,
    ...) and WARNING for the sidecar's own failures; its fields (`grpc_service`,
    `grpc_method`, `grpc_code`, `peer`, `duration_ms`) are record attributes, so JSON logs
    carry them as fields. A call the shutdown cut off at the end of its grace period is
    UNAVAILABLE, as its client saw it, not CANCELLED; `drain` counts the calls in flight, so
    that the stop can wait for their lines."""

    def __init__(
        self, metrics: SidecarMetrics | None = None, drain: CallDrain | None = None
    ) -> None:
        self._metrics = metrics or SidecarMetrics()
        self._drain = drain or CallDrain()
        self._handlers = WrappedHandlers(self._wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return self._handlers.get(continuation(handler_call_details), handler_call_details.method)

    def _wrap(self, behavior: Behavior, call_type: CallType, method: str) -> Behavior:
        series: MethodSeries = self._metrics.method_series(call_type.value, method)
        service, _, short_method = method.lstrip("/").rpartition("/")
        drain = self._drain

        def begin(context: grpc.ServicerContext) -> tuple[contextvars.Token[str], _Call]:
            rid = call_request_id(context)
            drain.started(context)
            series.started.inc()
            # Read now: grpc forgets the peer of a call it has ended (a deadline passed).
            return request_id.set(rid), _Call(rid, context.peer(), time.perf_counter())

        def finish(context: grpc.ServicerContext, call: _Call) -> None:
            try:
                log_call(context, call.request_id, call.started, call.peer)
            finally:
                drain.finished(context)

        def log_call(context: grpc.ServicerContext, rid: str, started: float, peer: str) -> None:
            elapsed = time.perf_counter() - started
            _add_trailing(context, REQUEST_ID_METADATA, rid)
            code, cut_off = _outcome(context, drain)
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            series.handled(name).inc()
            series.seconds.observe(elapsed)
            level = _access_level(code)
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "%s %s %s %.1fms%s",
                    method,
                    peer,
                    name,
                    elapsed * 1000,
                    " (cut off by the shutdown: still running when server.grace_s was over)"
                    if cut_off
                    else "",
                    extra={
                        "grpc_type": call_type.value,
                        "grpc_service": service,
                        "grpc_method": short_method,
                        "grpc_code": name,
                        "peer": peer,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )

        def requests(request: Any) -> Any:
            if call_type.streaming_request:
                return _counted(request, series.received)
            series.received.inc()
            return request

        if call_type.streaming_response:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                token, call = begin(context)
                try:
                    for answer in behavior(requests(request), context):
                        series.sent.inc()
                        yield answer
                finally:
                    finish(context, call)
                    request_id.reset(token)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            token, call = begin(context)
            try:
                answer = behavior(requests(request), context)
                series.sent.inc()
                return answer
            finally:
                finish(context, call)
                request_id.reset(token)

        return unary
