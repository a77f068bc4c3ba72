"""Prometheus metrics on their own port, and JSON logs with a request id per call."""

from __future__ import annotations

import json
import subprocess
import time

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.processes import free_port
from tests.support.sidecar_process import SidecarProcess


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
            stub.StreamMetrics(iter([pb.StreamMetricsRequest(points=points)]))
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
        scraped = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{running.server.metrics_port}/metrics"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    finally:
        running.stop()
    method = "/mlflow_sidecar.v1.ExperimentTrackingService"
    assert f'mlflow_sidecar_rpc_total{{code="OK",method="{method}/StartRun"}} 1.0' in scraped
    assert f'mlflow_sidecar_rpc_total{{code="NOT_FOUND",method="{method}/GetRun"}} 1.0' in scraped
    assert (
        f'mlflow_sidecar_rpc_duration_seconds_bucket{{le="0.5",method="{method}/StartRun"}}'
        in scraped
    )
    assert 'mlflow_sidecar_mlflow_call_duration_seconds_count{outcome="ok"}' in scraped
    assert "mlflow_sidecar_mlflow_retries_total" in scraped
    assert "mlflow_sidecar_metric_points_accepted_total 50.0" in scraped
    assert "mlflow_sidecar_metric_points_delivered_total 50.0" in scraped
    assert "mlflow_sidecar_spool_pending_points 0.0" in scraped
    assert "mlflow_sidecar_spool_oldest_age_seconds" in scraped
    assert "mlflow_sidecar_spool_dead_letter_points" in scraped
    assert 'mlflow_sidecar_stream_bytes_total{direction="upload"} 1000.0' in scraped
    downloaded = [
        line
        for line in scraped.splitlines()
        if line.startswith('mlflow_sidecar_stream_bytes_total{direction="download"}')
    ]
    assert downloaded and float(downloaded[0].split()[-1]) >= 1000


def test_json_logs_carry_a_request_id(mlflow_server, tmp_path):
    sidecar = SidecarProcess(tmp_path, mlflow_server.url, MLFLOW_SIDECAR__LOG_FORMAT="json")
    sidecar.start()
    try:
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.GetRun(pb.GetRunRequest(run_id="0" * 32))
        time.sleep(0.5)
    finally:
        sidecar.stop()
    records = [
        json.loads(line)
        for line in sidecar.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    access = [
        r
        for r in records
        if r.get("logger") == "mlflow_sidecar.access" and "GetRun" in r["message"]
    ]
    assert access, records[-5:]
    assert access[0]["level"] == "WARNING"
    assert "NOT_FOUND" in access[0]["message"]
    assert len(access[0]["request_id"]) == 16
