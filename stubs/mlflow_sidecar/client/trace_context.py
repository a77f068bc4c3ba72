"""W3C trace context from the trainer to the sidecar, when the trainer uses OpenTelemetry.

Needs only `opentelemetry-api` (no SDK): with an SDK configured, each call gets a CLIENT
span and its `traceparent` goes to the sidecar in the call's metadata; with the API alone,
the trainer's current context (if any) travels on unchanged. Without the API installed
the client sends no trace context and behaves as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_TRACER_NAME = "mlflow_sidecar.client"


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self, base: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


def _method_name(details: grpc.ClientCallDetails) -> str:
    method = details.method
    return (method.decode() if isinstance(method, bytes) else method).lstrip("/")


class TraceContextInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Starts a CLIENT span per call (ended when the call completes, retries included) and
    injects the current context into the call's metadata with the configured propagator
    (W3C `traceparent` by default)."""

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        name = _method_name(details)
        service, _, method = name.rpartition("/")
        span = trace.get_tracer(_TRACER_NAME).start_span(
            name,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = (*(details.metadata or ()), *carrier.items())
        try:
            outcome = continuation(_CallDetails(details, metadata), request)
        except BaseException:
            span.end()
            raise

        def done(call: Any) -> None:
            code = call.code()
            if isinstance(code, grpc.StatusCode):
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()

        outcome.add_done_callback(done)
        return outcome

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request_iterator)


def trace_context_interceptor() -> TraceContextInterceptor:
    """The interceptor (the import of this module fails without `opentelemetry-api`)."""
    return TraceContextInterceptor()
