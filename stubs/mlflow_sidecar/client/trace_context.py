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

from mlflow_sidecar.client.call_interceptor import CallInterceptor, with_metadata

_TRACER_NAME = "mlflow_sidecar.client"


def _method_name(details: grpc.ClientCallDetails) -> str:
    method = details.method
    return (method.decode() if isinstance(method, bytes) else method).lstrip("/")


class TraceContextInterceptor(CallInterceptor):
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
        try:
            outcome = continuation(with_metadata(details, *carrier.items()), request)
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


def trace_context_interceptor() -> TraceContextInterceptor:
    """The interceptor (the import of this module fails without `opentelemetry-api`)."""
    return TraceContextInterceptor()
