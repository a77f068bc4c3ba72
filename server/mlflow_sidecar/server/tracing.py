"""OpenTelemetry tracing, configured by the standard `OTEL_*` environment variables.

Off unless the environment asks for it: `OTEL_TRACES_EXPORTER` set to something other than
`none` (e.g. `console`, or `otlp` with `opentelemetry-exporter-otlp` installed), or an
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true`
turns it off. `OTEL_TRACES_SAMPLER` (and `OTEL_TRACES_SAMPLER_ARG`) are read here, so that
one the SDK does not know is refused; the SDK reads the rest itself (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_PROPAGATORS`, the exporters' own variables).

When on, every RPC gets a SERVER span whose parent is the caller's W3C `traceparent`
metadata, and every HTTP request to MLflow (MLflow's client speaks `requests`) a CLIENT
span under it that carries `traceparent` on to MLflow.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from mlflow_sidecar.server.interceptors import (
    Behavior,
    CallType,
    WrappedHandlers,
    code_the_client_saw,
)
from mlflow_sidecar.server.observability import CLIENT_CAUSED_CODES

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "mlflow-sidecar"
_EXPORTER_GROUP = "opentelemetry_traces_exporter"
# Health checks come every few seconds from probes: spans of them would bury real calls.
_UNTRACED_PREFIX = "/grpc.health.v1.Health/"
# The status comes from the call's status code (see `end`): an exception may be an abort
# carrying NOT_FOUND, which is no error of the server.
_NO_EXCEPTION_STATUS: dict[str, bool] = {
    "end_on_exit": False,
    "record_exception": False,
    "set_status_on_exception": False,
}


# The samplers OTEL_TRACES_SAMPLER names, as the SDK's tracer provider knows them.
_FIXED_SAMPLERS: dict[str, Sampler] = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": DEFAULT_ON,
    "parentbased_always_off": DEFAULT_OFF,
}
_RATIO_SAMPLERS: dict[str, Callable[[float], Sampler]] = {
    "traceidratio": TraceIdRatioBased,
    "parentbased_traceidratio": ParentBasedTraceIdRatio,
}


class TracingConfigError(ValueError):
    """The `OTEL_*` variables name something that is not installed or not valid."""


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """True when the environment turns tracing on (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter(name: str) -> SpanExporter:
    found = entry_points(group=_EXPORTER_GROUP, name=name)
    if not found:
        hint = " (pip install opentelemetry-exporter-otlp)" if name.startswith("otlp") else ""
        raise TracingConfigError(
            f"invalid OTEL_TRACES_EXPORTER: no span exporter named {name!r} is installed{hint}"
        )
    exporter_class: Callable[[], SpanExporter] = next(iter(found)).load()
    return exporter_class()


def tracing_from_env(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """The sidecar's tracing as the environment (default: the process's) configures it."""
    provider = tracer_provider_from_env(os.environ if environ is None else environ)
    return Tracing(provider) if provider is not None else None


def tracer_provider_from_env(environ: Mapping[str, str]) -> TracerProvider | None:
    """A tracer provider with the exporters the environment names; None when tracing is off."""
    if not tracing_requested(environ):
        return None
    names = [
        name.strip()
        for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")
        if name.strip() and name.strip().lower() != "none"
    ]
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, sampler=_sampler(environ))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def _sampler(environ: Mapping[str, str]) -> Sampler:
    """The sampler `OTEL_TRACES_SAMPLER` (and, for a ratio, `OTEL_TRACES_SAMPLER_ARG`)
    names; TracingConfigError for a name or ratio that is not one. The SDK would put its
    default in their place with a warning, and sample what was meant to be left out."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name in _FIXED_SAMPLERS:
        return _FIXED_SAMPLERS[name]
    if name not in _RATIO_SAMPLERS:
        known = ", ".join([*_FIXED_SAMPLERS, *_RATIO_SAMPLERS])
        raise TracingConfigError(
            f"invalid OTEL_TRACES_SAMPLER: no sampler named {name!r}; known: {known}"
        )
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0"
    try:
        ratio = float(arg)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:  # NaN included
        raise TracingConfigError(
            f"invalid OTEL_TRACES_SAMPLER_ARG: {arg!r} is not a ratio from 0 to 1 (for {name})"
        )
    return _RATIO_SAMPLERS[name](ratio)


class Tracing:
    """Tracing of one sidecar: its RPC interceptor, and MLflow's HTTP requests while it runs."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self.provider = provider
        self.interceptor = TracingInterceptor(provider.get_tracer("mlflow_sidecar.server"))

    def start(self) -> None:
        """Trace MLflow's HTTP requests (`requests` is patched process-wide)."""
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        RequestsInstrumentor().instrument(tracer_provider=self.provider)

    def stop(self) -> None:
        """Stop tracing HTTP requests and export what is left."""
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        RequestsInstrumentor().uninstrument()
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _metadata_carrier(context: grpc.ServicerContext) -> dict[str, str]:
    return {
        key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
    }


class TracingInterceptor(grpc.ServerInterceptor):
    """One SERVER span per RPC (health checks aside), child of the caller's `traceparent`,
    named `package.Service/Method` with the `rpc.*` attributes of OpenTelemetry's conventions.

    The span's status is ERROR only for the sidecar's own failures: outcomes the caller
    caused (NOT_FOUND, INVALID_ARGUMENT, ...) are not errors of the server."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._handlers = WrappedHandlers(self._wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return self._handlers.get(continuation(handler_call_details), handler_call_details.method)

    def _wrap(self, behavior: Behavior, call_type: CallType, method: str) -> Behavior:
        if method.startswith(_UNTRACED_PREFIX):
            return behavior
        tracer = self._tracer
        service, _, short_method = method.lstrip("/").rpartition("/")
        name = f"{service}/{short_method}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": short_method}

        def start(context: grpc.ServicerContext) -> trace.Span:
            parent = propagate.extract(_metadata_carrier(context))
            return tracer.start_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attributes
            )

        def end(span: trace.Span, context: grpc.ServicerContext) -> None:
            code = code_the_client_saw(context)
            if isinstance(code, grpc.StatusCode):
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK and code not in CLIENT_CAUSED_CODES:
                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()

        if call_type.streaming_response:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                span = start(context)
                try:
                    with trace.use_span(span, **_NO_EXCEPTION_STATUS):
                        yield from behavior(request, context)
                finally:
                    end(span, context)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            span = start(context)
            try:
                with trace.use_span(span, **_NO_EXCEPTION_STATUS):
                    return behavior(request, context)
            finally:
                end(span, context)

        return unary
