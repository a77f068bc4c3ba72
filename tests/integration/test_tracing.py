"""OpenTelemetry: one trainer call is one trace, from the typed client through the sidecar
to MLflow's HTTP requests, against a real `mlflow server`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.delay_proxy import DelayProxy
from tests.support.sidecar_process import SidecarProcess

# The trainer: the SDK with an in-memory exporter, one typed-client call, the spans dumped.
TRAINER = """
import json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from mlflow_sidecar.client import ClientContainer

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
container = ClientContainer()
container.config.from_dict({"target": sys.argv[1]})
tracking = container.experiment_tracking()
experiment = tracking.create_experiment(sys.argv[2], get_if_exists=True)
if len(sys.argv) > 3:  # a file to upload to a new run
    run = tracking.start_run(experiment.experiment_id)
    tracking.upload_artifact(run.run_id, sys.argv[3], "weights.bin")
container.shutdown_resources()
print(json.dumps([json.loads(span.to_json()) for span in exporter.get_finished_spans()]))
"""


def console_spans(path: Path) -> list[dict]:
    """The spans the console exporter printed: indented JSON objects, one after another."""
    decoder, text, spans, at = json.JSONDecoder(), path.read_text(), [], 0
    while (start := text.find("{", at)) != -1:
        span, at = decoder.raw_decode(text, start)
        spans.append(span)
    return spans


def test_one_trainer_call_is_one_trace_from_client_to_mlflow_http(mlflow_server, tmp_path):
    # MLflow behind a recording proxy: what reaches MLflow is seen, headers and all.
    with DelayProxy(mlflow_server.url, delay_s=0, delayed=lambda _m, _p: False) as mlflow:
        sidecar = SidecarProcess(
            tmp_path / "sidecar",
            mlflow.url,
            stdout_path=tmp_path / "spans.json",
            OTEL_TRACES_EXPORTER="console",
            OTEL_SERVICE_NAME="sidecar-under-test",
        )
        sidecar.start()
        try:
            trainer = subprocess.run(
                [sys.executable, "-c", TRAINER, sidecar.target, f"traced-{uuid.uuid4().hex[:8]}"],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
        finally:
            sidecar.stop()  # exports what is left
    rpc = "mlflow_sidecar.v1.ExperimentTrackingService/CreateExperiment"
    (client,) = [s for s in json.loads(trainer.stdout) if s["name"] == rpc]
    assert client["kind"] == "SpanKind.CLIENT"
    trace_id = client["context"]["trace_id"]

    served = console_spans(tmp_path / "spans.json")
    (server,) = [s for s in served if s["name"] == rpc]
    assert server["kind"] == "SpanKind.SERVER"
    assert server["context"]["trace_id"] == trace_id
    assert server["parent_id"] == client["context"]["span_id"]
    assert server["attributes"]["rpc.grpc.status_code"] == 0
    assert server["resource"]["attributes"]["service.name"] == "sidecar-under-test"

    http = [s for s in served if s["parent_id"] == server["context"]["span_id"]]
    assert http, served
    for span in http:
        assert span["kind"] == "SpanKind.CLIENT"
        assert span["context"]["trace_id"] == trace_id
        url = span["attributes"].get("url.full") or span["attributes"]["http.url"]
        assert url.startswith(mlflow.url + "/api/2.0/mlflow/"), url

    # MLflow got the trace context: `00-<trace id>-<the HTTP span's id>-<flags>`.
    create = [tp for m, p, tp in mlflow.traceparents if p.endswith("/experiments/create")]
    assert create, mlflow.traceparents
    version, sent_trace, sent_parent, _flags = create[0].split("-")
    assert (version, f"0x{sent_trace}") == ("00", trace_id)
    assert f"0x{sent_parent}" in {span["context"]["span_id"] for span in http}


def test_an_uploads_put_to_mlflow_belongs_to_the_uploads_trace(mlflow_server, tmp_path):
    # The PUT of the file's bytes is made from a thread of its own: it still carries the
    # call's trace on to MLflow.
    upload = tmp_path / "weights.bin"
    upload.write_bytes(b"w" * 4096)
    with DelayProxy(mlflow_server.url, delay_s=0, delayed=lambda _m, _p: False) as mlflow:
        sidecar = SidecarProcess(
            tmp_path / "sidecar",
            mlflow.url,
            stdout_path=tmp_path / "spans.json",
            OTEL_TRACES_EXPORTER="console",
        )
        sidecar.start()
        try:
            trainer = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    TRAINER,
                    sidecar.target,
                    f"traced-{uuid.uuid4().hex[:8]}",
                    str(upload),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
        finally:
            sidecar.stop()
    rpc = "mlflow_sidecar.v1.ExperimentTrackingService/UploadArtifact"
    (client,) = [s for s in json.loads(trainer.stdout) if s["name"] == rpc]
    puts = [tp for m, p, tp in mlflow.traceparents if m == "PUT" and p.endswith("weights.bin")]
    assert puts, mlflow.traceparents
    for traceparent in puts:
        assert f"0x{traceparent.split('-')[1]}" == client["context"]["trace_id"]
    served = console_spans(tmp_path / "spans.json")
    (server,) = [s for s in served if s["name"] == rpc]
    assert server["context"]["trace_id"] == client["context"]["trace_id"]


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        (
            "OTEL_TRACES_EXPORTER",
            "nonesuch",
            "invalid OTEL_TRACES_EXPORTER: no span exporter named 'nonesuch' is installed",
        ),
        # OpenTelemetry itself would refuse it with a traceback at its first import.
        (
            "OTEL_PROPAGATORS",
            "tracecontext,tracecontex",
            "invalid OTEL_PROPAGATORS: no propagator named 'tracecontex' is installed;"
            " known: baggage, tracecontext (or none)",
        ),
    ],
)
def test_an_otel_variable_naming_nothing_installed_stops_serve_with_one_line(
    tmp_path, variable, value, line
):
    sidecar = SidecarProcess(tmp_path, "", **{variable: value})
    sidecar.launch()
    assert sidecar.proc is not None
    assert sidecar.proc.wait(timeout=120) == 2
    lines = sidecar.log_path.read_text().strip().splitlines()
    assert lines == [f"mlflow-sidecar: {line}"]
