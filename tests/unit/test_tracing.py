"""Tracing: off unless OTEL_* asks for it; server spans continue the caller's trace and are
errors only for the sidecar's own failures; the client propagates with the API alone, and
works without OpenTelemetry at all."""

from __future__ import annotations

import subprocess
import sys
import time
from importlib.metadata import entry_points

import grpc
import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core import errors
from mlflow_sidecar.server.otel_propagators import propagators_refusal
from mlflow_sidecar.server.tracing import (
    TracingConfigError,
    TracingInterceptor,
    tracer_provider_from_env,
    tracing_requested,
)
from mlflow_sidecar.v1 import tracking_pb2, tracking_pb2_grpc
from tests.unit.test_error_mapping import RaisingService, _start


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_tracing_is_off_unless_the_environment_asks(environ, on):
    assert tracing_requested(environ) is on
    if "OTEL_TRACES_EXPORTER" in environ or not on:
        assert (tracer_provider_from_env(environ) is not None) is on


def test_otlp_is_the_default_exporter_and_its_package_is_named_when_missing():
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    if entry_points(group="opentelemetry_traces_exporter", name="otlp"):
        assert tracer_provider_from_env(environ) is not None
    else:
        with pytest.raises(TracingConfigError, match="pip install opentelemetry-exporter-otlp"):
            tracer_provider_from_env(environ)


def test_an_exporter_that_is_not_installed_is_named():
    with pytest.raises(TracingConfigError, match=r"OTEL_TRACES_EXPORTER.*'nonesuch'"):
        tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console,nonesuch"})


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio_typo"},
            r"OTEL_TRACES_SAMPLER: .*'traceidratio_typo'",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "ten percent"},
            r"OTEL_TRACES_SAMPLER_ARG: 'ten percent'",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            r"OTEL_TRACES_SAMPLER_ARG: '2'",
        ),
    ],
)
def test_a_sampler_the_sdk_would_replace_is_named(environ, named):
    with pytest.raises(TracingConfigError, match=named):
        tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console", **environ})


@pytest.mark.parametrize(
    ("environ", "description"),
    [
        ({}, "ParentBased{root:AlwaysOnSampler"),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, "AlwaysOffSampler"),
        (
            {"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            "TraceIdRatioBased{0.25}",
        ),
    ],
)
def test_the_sampler_follows_the_environment(environ, description):
    provider = tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console", **environ})
    assert provider is not None
    assert provider.sampler.get_description().startswith(description)


def test_the_service_is_named_unless_the_environment_names_it(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    provider = tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "mlflow-sidecar"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trainer-7-sidecar")
    provider = tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "trainer-7-sidecar"


@pytest.fixture()
def traced_server(tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = RaisingService()
    interceptor = TracingInterceptor(provider.get_tracer("test"))
    server, port = _start(tmp_path, service, interceptors=(interceptor,))
    container = ClientContainer()
    container.config.from_dict({"target": f"127.0.0.1:{port}", "max_attempts": 1})
    yield container.experiment_tracking(), service, exporter, port
    container.shutdown_resources()
    server.stop(0)


def test_the_client_carries_the_callers_context_with_the_api_alone(traced_server):
    # No SDK tracer provider in this process: the client's tracer is the API's no-op one,
    # and the trainer's context (here a remote parent) still reaches the sidecar.
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    tracking, service, exporter, _ = traced_server
    service.error = errors.NotFoundError("no such run")
    parent = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        with pytest.raises(errors.NotFoundError):
            tracking.get_run("r" * 32)
    finally:
        context.detach(token)
    (span,) = exporter.get_finished_spans()
    assert span.name == "mlflow_sidecar.v1.ExperimentTrackingService/GetRun"
    assert span.kind == trace.SpanKind.SERVER
    assert span.context.trace_id == parent.trace_id
    assert span.parent is not None and span.parent.span_id == parent.span_id
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.status.status_code == trace.StatusCode.UNSET  # the caller's outcome


def test_a_server_span_is_an_error_for_the_sidecars_own_failures(traced_server):
    tracking, service, exporter, _ = traced_server
    service.error = errors.UnavailableError("MLflow unreachable")
    with pytest.raises(errors.UnavailableError):
        tracking.get_run("r" * 32)
    (span,) = exporter.get_finished_spans()
    assert span.parent is None  # no context from the caller: a trace of its own
    assert span.status.status_code == trace.StatusCode.ERROR
    assert span.status.description == "UNAVAILABLE"


def test_the_client_works_without_opentelemetry_installed():
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"  # as if it were not installed
        "from mlflow_sidecar.client.channel import SharedChannel, _trace_context_interceptor\n"
        "from mlflow_sidecar.client.settings import ClientSettings\n"
        "assert _trace_context_interceptor() is None\n"
        "SharedChannel(ClientSettings(target='127.0.0.1:1')).close()\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_a_server_span_whose_deadline_passed_in_the_handler_is_an_error(traced_server):
    # The handler's own outcome (NOT_FOUND) came after grpc had ended the call: the span
    # says what the client saw, as the access log does.
    _, service, exporter, port = traced_server

    def slow_get_run(*_args: object, **_kwargs: object) -> None:
        time.sleep(1.0)
        raise errors.NotFoundError("no such run")

    service.get_run = slow_get_run
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as ended:
            stub.GetRun(tracking_pb2.GetRunRequest(run_id="r" * 32), timeout=0.3)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while not exporter.get_finished_spans():
        assert time.monotonic() < deadline, "the span never ended"
        time.sleep(0.05)
    (span,) = exporter.get_finished_spans()
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert span.status.status_code == trace.StatusCode.ERROR


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ("", False),
        ("tracecontext,baggage", False),
        (" tracecontext ", False),
        ("none", False),
        ("tracecontex", True),
        ("tracecontext,b3", True),
    ],
)
def test_propagators_are_checked_before_opentelemetry_loads_them(value, refused):
    refusal = propagators_refusal({"OTEL_PROPAGATORS": value})
    assert (refusal is not None) == refused
    if refused:
        assert refusal.startswith("invalid OTEL_PROPAGATORS: no propagator named")
