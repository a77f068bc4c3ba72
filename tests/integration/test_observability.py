"""Prometheus metrics and probes on their own port, and JSON logs with a request id per call."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.certs import make_pki
from tests.support.processes import free_port
from tests.support.sidecar_process import SidecarProcess

TRACKING = "mlflow_sidecar.v1.ExperimentTrackingService"


def curl(url: str) -> tuple[int, str]:
    """`curl` as an operator or a kubelet would: the HTTP status and the body."""
    result = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def wait_until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def sample(scraped: str, name: str, **labels: str) -> float | None:
    """The value of the series `name` with exactly these labels, or None."""
    for line in scraped.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        found = {}
        if "{" in head:
            for pair in head[head.index("{") + 1 : -1].split('",'):
                key, _, raw = pair.partition("=")
                found[key] = raw.strip('"')
        if head.split("{")[0] == name and found == labels:
            return float(value)
    return None


def test_metrics_port_shows_the_named_series(mlflow_server, tmp_path):
    running = RunningSidecar(
        sidecar_config(tmp_path, mlflow_server.url, metrics={"port": free_port()})
    )
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            exp = stub.CreateExperiment(pb.CreateExperimentRequest(name="metrics-demo"))
            run = stub.StartRun(pb.StartRunRequest(experiment_id=exp.experiment.experiment_id))
            points = [
                pb.MetricPoint(run_id=run.run.info.run_id, key="m", step=i) for i in range(50)
            ]
            stub.StreamMetrics(iter([pb.StreamMetricsRequest(points=points)] * 2))
            stub.FlushMetrics(pb.FlushMetricsRequest(), timeout=60)
            with pytest.raises(grpc.RpcError):
                stub.GetRun(pb.GetRunRequest(run_id="0" * 32))
        container = ClientContainer()
        container.config.from_dict({"target": running.target})
        try:
            source = tmp_path / "weights.bin"
            source.write_bytes(b"w" * 1000)
            tracking = container.experiment_tracking()
            tracking.upload_artifact(run.run.info.run_id, source, "weights.bin")
            tracking.download_artifact(run.run.info.run_id, "weights.bin", tmp_path / "back")
        finally:
            container.shutdown_resources()
        wait_until(lambda: running.server.mlflow_probe.reachable is True)
        status, scraped = curl(f"http://127.0.0.1:{running.server.metrics_port}/metrics")
    finally:
        running.stop()
    assert status == 200

    def grpc_labels(kind: str, method: str, **more: str) -> dict[str, str]:
        return {"grpc_type": kind, "grpc_service": TRACKING, "grpc_method": method, **more}

    unary = grpc_labels("unary", "StartRun")
    assert sample(scraped, "grpc_server_started_total", **unary) == 1
    assert sample(scraped, "grpc_server_handled_total", **unary, grpc_code="OK") == 1
    assert sample(scraped, "grpc_server_msg_received_total", **unary) == 1
    assert sample(scraped, "grpc_server_msg_sent_total", **unary) == 1
    assert sample(scraped, "grpc_server_handling_seconds_count", **unary) == 1
    assert sample(scraped, "grpc_server_handling_seconds_bucket", **unary, le="+Inf") == 1
    missing = grpc_labels("unary", "GetRun", grpc_code="NOT_FOUND")
    assert sample(scraped, "grpc_server_handled_total", **missing) == 1
    assert sample(scraped, "grpc_server_msg_sent_total", **grpc_labels("unary", "GetRun")) == 0
    stream_in = grpc_labels("client_stream", "StreamMetrics")
    assert sample(scraped, "grpc_server_msg_received_total", **stream_in) == 2
    assert sample(scraped, "grpc_server_msg_sent_total", **stream_in) == 1
    stream_out = grpc_labels("server_stream", "DownloadArtifact")
    # The header, one chunk, the trailer.
    assert sample(scraped, "grpc_server_msg_sent_total", **stream_out) == 3
    assert sample(scraped, "grpc_server_handled_total", **stream_out, grpc_code="OK") == 1
    assert "mlflow_sidecar_rpc" not in scraped  # the old names are gone

    build = [line for line in scraped.splitlines() if line.startswith("mlflow_sidecar_build_info")]
    assert len(build) == 1 and build[0].endswith(" 1.0") and 'version="' in build[0]
    assert sample(scraped, "mlflow_sidecar_mlflow_up") == 1
    assert 'mlflow_sidecar_mlflow_call_duration_seconds_count{outcome="ok"}' in scraped
    assert sample(scraped, "mlflow_sidecar_mlflow_retries_total") is not None
    assert sample(scraped, "mlflow_sidecar_metric_points_accepted_total") == 100
    assert sample(scraped, "mlflow_sidecar_metric_points_delivered_total") == 100
    # Fitted to the server between one call and spool.delivery_workers (4 by default).
    assert sample(scraped, "mlflow_sidecar_delivery_calls_limit") in {1, 2, 3, 4}
    assert sample(scraped, "mlflow_sidecar_spool_pending_points") == 0
    assert sample(scraped, "mlflow_sidecar_spool_oldest_age_seconds") is not None
    assert sample(scraped, "mlflow_sidecar_spool_dead_letter_points") == 0
    assert sample(scraped, "mlflow_sidecar_spool_held_run_ends") == 0
    assert sample(scraped, "mlflow_sidecar_stream_bytes_total", direction="upload") == 1000
    # The file's bytes, as for the upload: not the messages' framing around them.
    assert sample(scraped, "mlflow_sidecar_stream_bytes_total", direction="download") == 1000


def test_readyz_follows_mlflow_and_healthz_stays_up(own_mlflow, tmp_path):
    def start(name: str, **health: object) -> RunningSidecar:
        return RunningSidecar(
            sidecar_config(
                tmp_path / name,
                own_mlflow.url,
                metrics={"port": free_port()},
                mlflow={"probe_interval_s": 0.2},
                health=health,
            )
        )

    strict = start("strict")
    lenient = start("lenient", ready_requires_mlflow=False)
    try:
        ready_url = f"http://127.0.0.1:{strict.server.metrics_port}/readyz"
        live_url = f"http://127.0.0.1:{strict.server.metrics_port}/healthz"
        lenient_url = f"http://127.0.0.1:{lenient.server.metrics_port}/readyz"
        wait_until(lambda: curl(ready_url)[0] == 200)
        status, body = curl(ready_url)
        checks = json.loads(body)["checks"]
        assert checks["grpc"]["ok"] and checks["spool"]["ok"] and checks["mlflow"]["ok"]
        assert checks["spool"]["pending_points"] == 0

        own_mlflow.stop()
        wait_until(lambda: curl(ready_url)[0] == 503)
        report = json.loads(curl(ready_url)[1])
        assert report["status"] == "not ready"
        assert report["checks"]["mlflow"] == {"ok": False, "required": True}
        assert report["checks"]["grpc"]["ok"] and report["checks"]["spool"]["ok"]
        assert curl(live_url) == (200, '{"status":"ok"}')
        metrics_url = f"http://127.0.0.1:{strict.server.metrics_port}/metrics"
        assert sample(curl(metrics_url)[1], "mlflow_sidecar_mlflow_up") == 0
        wait_until(lambda: lenient.server.mlflow_probe.reachable is False)
        status, body = curl(lenient_url)
        assert status == 200, body
        assert json.loads(body)["checks"]["mlflow"] == {"ok": False, "required": False}

        own_mlflow.start()
        wait_until(lambda: curl(ready_url)[0] == 200)
        assert sample(curl(metrics_url)[1], "mlflow_sidecar_mlflow_up") == 1
    finally:
        strict.stop()
        lenient.stop()


def test_readyz_is_503_while_the_spool_is_above_its_high_water_mark(tmp_path):
    running = RunningSidecar(
        sidecar_config(
            tmp_path,
            "http://127.0.0.1:9",  # nothing listens: points stay in the spool
            metrics={"port": free_port()},
            spool={"max_points": 100},
            health={"ready_requires_mlflow": False, "spool_high_water": 0.5},
        )
    )
    try:
        url = f"http://127.0.0.1:{running.server.metrics_port}/readyz"
        assert curl(url)[0] == 200
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            points = [pb.MetricPoint(run_id="r" * 32, key="m", step=i) for i in range(60)]
            stub.StreamMetrics(iter([pb.StreamMetricsRequest(points=points)]))
        status, body = curl(url)
        assert status == 503, body
        assert json.loads(body)["checks"]["spool"] == {
            "ok": False,
            "pending_points": 60,
            "high_water": 50,
        }
    finally:
        running.stop()


def test_the_callers_request_id_is_logged_and_returned(sidecar):
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.GetRun(
                pb.GetRunRequest(run_id="0" * 32), metadata=(("x-request-id", "trace-me-42"),)
            )
        trailing = dict(failed.value.trailing_metadata())
        assert trailing["x-request-id"] == "trace-me-42"
        assert "grpc-status-details-bin" in trailing  # the error's details are kept
        _, call = stub.SearchExperiments.with_call(pb.SearchExperimentsRequest())
        generated = dict(call.trailing_metadata())["x-request-id"]
        assert len(generated) == 16 and generated != "trace-me-42"
        points = [pb.MetricPoint(run_id="a" * 32, key="m", value=1.0, step=1)]
        _, call = stub.StreamMetrics.with_call(
            iter([pb.StreamMetricsRequest(points=points)]),
            metadata=(("x-request-id", "stream-7"),),
        )
        trailing = dict(call.trailing_metadata())
        assert trailing["x-request-id"] == "stream-7"
        assert trailing["accepted-points"] == "1"  # the handler's own trailer stays


def test_json_logs_are_json_for_every_logger_with_fields_of_their_own(tmp_path):
    # The embedded store: its first start runs MLflow's migrations, which log through
    # MLflow's and alembic's loggers.
    sidecar = SidecarProcess(tmp_path, "", MLFLOW_SIDECAR__LOG_FORMAT="json")
    sidecar.start()
    try:
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.GetRun(
                    pb.GetRunRequest(run_id="0" * 32), metadata=(("x-request-id", "abc-123"),)
                )
    finally:
        sidecar.stop()
    lines = [line for line in sidecar.log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is a JSON object
    assert {r["logger"] for r in records} >= {"mlflow.store.db.utils", "mlflow_sidecar.access"}
    for record in records:
        assert record["time"].endswith("Z") and record["time"][10] == "T", record
    access = [r for r in records if r["logger"] == "mlflow_sidecar.access"]
    assert len(access) == 1, access
    assert access[0]["level"] == "INFO"  # NOT_FOUND is the caller's outcome, not a failure
    assert access[0]["request_id"] == "abc-123"
    assert access[0]["grpc_service"] == TRACKING
    assert access[0]["grpc_method"] == "GetRun"
    assert access[0]["grpc_type"] == "unary"
    assert access[0]["grpc_code"] == "NOT_FOUND"
    assert access[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert access[0]["duration_ms"] >= 0


def test_json_logs_stay_json_when_runs_end_in_an_mlflow_server(mlflow_server, tmp_path):
    # MLflow's client prints a "View run" link to stdout when a run ends on a server.
    sidecar = SidecarProcess(tmp_path, mlflow_server.url, MLFLOW_SIDECAR__LOG_FORMAT="json")
    sidecar.start()
    try:
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            experiment = stub.CreateExperiment(
                pb.CreateExperimentRequest(name=f"json-{tmp_path.name}", get_if_exists=True)
            ).experiment
            run = stub.StartRun(pb.StartRunRequest(experiment_id=experiment.experiment_id)).run
            stub.EndRun(pb.EndRunRequest(run_id=run.info.run_id))
    finally:
        sidecar.stop()
    lines = [line for line in sidecar.log_path.read_text().splitlines() if line.strip()]
    assert [json.loads(line)["logger"] for line in lines]  # every line is a JSON object


def test_probes_speak_https_with_the_listeners_certificate(mlflow_server, tmp_path):
    pki = make_pki(tmp_path / "pki")
    running = RunningSidecar(
        sidecar_config(
            tmp_path / "sidecar",
            mlflow_server.url,
            metrics={"port": free_port()},
            tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
            health={"ready_requires_mlflow": False},
        )
    )
    try:
        port = running.server.metrics_port
        verified = subprocess.run(
            ["curl", "-s", "--cacert", str(pki.ca_cert), f"https://localhost:{port}/healthz"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        plain = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{port}/healthz"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        running.stop()
    assert verified.stdout == '{"status":"ok"}', verified.stderr
    assert plain.stdout != '{"status":"ok"}'  # no plaintext answer on a TLS listener


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("a" * 128, True),
        ("Az09._:/+=-" * 11 + "abcdefg", True),
        ("a" * 129, False),
        ("has space", False),
        ("a;b", False),
    ],
    ids=["128-chars", "every-allowed-char", "129-chars", "space", "semicolon"],
)
def test_a_callers_request_id_is_taken_only_up_to_128_plain_characters(sidecar, sent, kept):
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        _, call = stub.SearchExperiments.with_call(
            pb.SearchExperimentsRequest(page_size=1), metadata=(("x-request-id", sent),)
        )
    returned = dict(call.trailing_metadata())["x-request-id"]
    if kept:
        assert returned == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{16}", returned), returned


def test_health_watch_stays_out_of_the_access_log_and_the_grpc_series(
    mlflow_server, tmp_path, caplog
):
    running = RunningSidecar(
        sidecar_config(tmp_path, mlflow_server.url, metrics={"port": free_port()})
    )
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="mlflow_sidecar.access"),
            grpc.insecure_channel(running.target) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            # Check, unlike Watch, is an ordinary call: logged and counted.
            health.Check(health_pb2.HealthCheckRequest(), timeout=60)
        status, scraped = curl(f"http://127.0.0.1:{running.server.metrics_port}/metrics")
    finally:
        running.stop()
    assert status == 200
    logged = [r.getMessage() for r in caplog.records if r.name == "mlflow_sidecar.access"]
    assert any("/grpc.health.v1.Health/Check " in m for m in logged), logged
    assert not any("/grpc.health.v1.Health/Watch" in m for m in logged), logged
    health_labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    assert sample(scraped, "grpc_server_started_total", grpc_type="unary", **health_labels) == 1
    series = [line for line in scraped.splitlines() if line.startswith("grpc_server_")]
    assert not [line for line in series if 'grpc_method="Watch"' in line]
