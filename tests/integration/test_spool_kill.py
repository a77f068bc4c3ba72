"""SIGKILL the sidecar while it delivers: every accepted point reaches MLflow exactly once."""

from __future__ import annotations

import time

import grpc
import mlflow

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.support.sidecar_process import SidecarProcess

RUNS = 4
POINTS = 50_000
STEPS = POINTS // RUNS


def pending(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        return stub.FlushMetrics(pb.FlushMetricsRequest(), timeout=1.0).pending_points


def test_sigkill_mid_delivery_loses_nothing_and_doubles_nothing(mlflow_server, tmp_path, unique):
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    exp = plain.create_experiment(f"kill-{unique}")
    runs = [plain.create_run(exp).info.run_id for _ in range(RUNS)]

    sidecar = SidecarProcess(tmp_path / "sidecar", mlflow_server.url)
    sidecar.start()
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target})
    try:
        with container.metric_stream() as stream:
            for step in range(STEPS):
                for index, run_id in enumerate(runs):
                    stream.log(run_id, "pnl", float(step * RUNS + index), step=step)
        assert stream.accepted == POINTS

        # Kill once delivery is under way but far from done.
        deadline = time.monotonic() + 120
        left = POINTS
        while time.monotonic() < deadline:
            left = pending(sidecar.target)
            if left < POINTS - 2000:
                break
            time.sleep(0.05)
        assert 0 < left < POINTS, f"delivery did not start or finished too fast ({left} left)"
        sidecar.kill()

        sidecar.start()  # same data dir and port: it resumes from the spool
        # The client's channel reconnects by itself.
        tracking = container.experiment_tracking()
        assert tracking.flush_metrics(timeout_s=300).pending_points == 0
    finally:
        container.shutdown_resources()
        sidecar.stop()

    for index, run_id in enumerate(runs):
        history = plain.get_metric_history(run_id, "pnl")
        assert len(history) == STEPS, f"run {index}: {len(history)} points, expected {STEPS}"
        assert sorted((m.step, m.value) for m in history) == [
            (step, float(step * RUNS + index)) for step in range(STEPS)
        ]
