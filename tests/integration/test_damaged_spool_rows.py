"""A spool row damaged between two starts, with a real MLflow server: it is dead-lettered
as damaged, and every other point is delivered."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import mlflow

from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.processes import MlflowServer

POINTS = 500
# Nothing listens there: the points stay in the spool.
UNREACHABLE = "http://127.0.0.1:9"


def stream(target: str, run_id: str) -> None:
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
        pb_grpc.ExperimentTrackingServiceStub(channel).StreamMetrics(iter([request]), timeout=30)


def test_a_damaged_spool_row_is_a_dead_letter_and_the_other_runs_arrive(
    mlflow_server: MlflowServer, tmp_path: Path, unique: str
) -> None:
    data = tmp_path / "sidecar"
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = plain.create_experiment(f"damaged-{unique}")
    damaged, intact = (plain.create_run(experiment_id).info.run_id for _ in range(2))

    outage = RunningSidecar(sidecar_config(data, UNREACHABLE))
    try:
        stream(outage.target, damaged)
        stream(outage.target, intact)
    finally:
        outage.stop()
    db = sqlite3.connect(data / "spool.db")
    db.execute(
        "UPDATE chunks SET vals = substr(vals, 1, length(vals) - 3) WHERE run_id = ?", (damaged,)
    )
    db.commit()
    db.close()

    restarted = RunningSidecar(sidecar_config(data, mlflow_server.url))
    try:
        with grpc.insecure_channel(restarted.target) as channel:
            flushed = pb_grpc.ExperimentTrackingServiceStub(channel).FlushMetrics(
                pb.FlushMetricsRequest(max_wait_s=60), timeout=90
            )
        letters = restarted.container.spool_store().status().dead_letters
    finally:
        restarted.stop()
    assert (flushed.pending_points, flushed.dead_letter_points) == (0, POINTS)
    assert [(g.run_id, g.points) for g in letters] == [(damaged, POINTS)]
    assert f"of run {damaged} is damaged" in letters[0].reason
    assert "key pnl" in letters[0].reason
    assert len(plain.get_metric_history(intact, "pnl")) == POINTS
    assert plain.get_metric_history(damaged, "pnl") == []
