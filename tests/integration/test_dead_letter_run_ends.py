"""A run end recorded behind a backlog that MLflow then refuses, with a real MLflow server:
the end stays with the run's dead letters and `spool requeue` applies it after them."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import mlflow
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.server.cli import main
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.processes import MlflowServer

POINTS = 2000
END_TIME_MS = 1_700_000_999_000
# Nothing listens there: the sidecar spools the points and records the end.
UNREACHABLE = "http://127.0.0.1:9"


def stream_then_end(target: str, run_id: str) -> int:
    """POINTS points of the run, then EndRun(FAILED); returns its pending_points."""
    steps = list(range(POINTS))
    request = pb.StreamMetricsRequest()
    request.series.add(
        run_id=run_id,
        key="pnl",
        values=[float(s) for s in steps],
        timestamps_ms=[1_700_000_000_000 + s for s in steps],
        steps=steps,
    )
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        stub.StreamMetrics(iter([request]), timeout=30)
        ended = stub.EndRun(
            pb.EndRunRequest(run_id=run_id, status=pb.RUN_STATUS_FAILED, end_time_ms=END_TIME_MS),
            timeout=30,
        )
    return ended.pending_points


def flush(target: str, run_id: str) -> pb.FlushMetricsResponse:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        response: pb.FlushMetricsResponse = stub.FlushMetrics(
            pb.FlushMetricsRequest(run_id=run_id, max_wait_s=60), timeout=90
        )
    return response


@pytest.mark.parametrize("refusal", ["run deleted", "another MLflow"])
def test_a_refused_end_is_kept_with_its_dead_letters_and_applied_after_requeue(
    refusal: str,
    mlflow_server: MlflowServer,
    tmp_path: Path,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "sidecar"
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    run_id = plain.create_run(plain.create_experiment(f"held-end-{unique}")).info.run_id

    outage = RunningSidecar(sidecar_config(data, UNREACHABLE))
    try:
        assert stream_then_end(outage.target, run_id) == POINTS
    finally:
        outage.stop()

    # MLflow refuses the backlog for good: the run was deleted meanwhile, or the sidecar
    # came back against another MLflow (here its embedded store), which has no such run.
    if refusal == "run deleted":
        plain.delete_run(run_id)
        refusing = RunningSidecar(sidecar_config(data, mlflow_server.url))
    else:
        refusing = RunningSidecar(sidecar_config(data, ""))
    try:
        refused = flush(refusing.target, run_id)
        typed = ClientContainer()
        typed.config.from_dict({"target": refusing.target, "timeout_s": 30.0})
        try:
            seen = typed.experiment_tracking().flush_metrics(run_id, timeout_s=0)
        finally:
            typed.shutdown_resources()
    finally:
        refusing.stop()
    assert (seen.complete, seen.dead_letter_points, seen.held_run_ends) == (True, POINTS, 1)
    assert (refused.pending_points, refused.dead_letter_points) == (0, POINTS)
    assert (refused.pending_run_ends, refused.held_run_ends) == (0, 1)
    assert plain.get_run(run_id).info.status == "RUNNING"

    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(data))
    monkeypatch.delenv("MLFLOW_SIDECAR_CONFIG", raising=False)
    capsys.readouterr()
    assert main(["spool", "status", "--json"]) == 0
    held = json.loads(capsys.readouterr().out)["held_run_ends"]
    assert [(h["run_id"], h["status"], h["end_time_ms"]) for h in held] == [
        (run_id, "FAILED", END_TIME_MS)
    ]

    if refusal == "run deleted":
        plain.restore_run(run_id)
    assert main(["spool", "requeue"]) == 0
    assert f"requeued {POINTS} dead-lettered points and 1 held run ends" in (
        capsys.readouterr().out
    )

    restored = RunningSidecar(sidecar_config(data, mlflow_server.url))
    try:
        delivered = flush(restored.target, run_id)
    finally:
        restored.stop()
    assert (delivered.pending_points, delivered.dead_letter_points) == (0, 0)
    assert (delivered.pending_run_ends, delivered.held_run_ends) == (0, 0)
    run = plain.get_run(run_id)
    assert (run.info.status, run.info.end_time) == ("FAILED", END_TIME_MS)
    history = plain.get_metric_history(run_id, "pnl")
    assert sorted(m.step for m in history) == list(range(POINTS))
