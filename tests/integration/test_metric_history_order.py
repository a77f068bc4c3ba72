"""GetMetricHistory answers in the order its contract names: by step, then timestamp,
however the points were logged, and its pages cut that order without gaps or repeats."""

from __future__ import annotations

import grpc

from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

T0 = 1_700_000_000_000


def _history(stub, run_id: str, page_size: int) -> list[pb.Metric]:
    points: list[pb.Metric] = []
    token = ""
    while True:
        page = stub.GetMetricHistory(
            pb.GetMetricHistoryRequest(
                run_id=run_id, metric_key="loss", page_size=page_size, page_token=token
            )
        )
        points += page.metrics
        token = page.next_page_token
        if not token:
            return points


def test_history_is_ordered_by_step_then_timestamp_across_pages(either_sidecar, unique):
    # Later steps logged earlier (a resumed run re-logging from a checkpoint), and ties:
    # several points at one step, some of them at one timestamp.
    logged = [
        (5, T0 + 1, 50.0),
        (4, T0 + 2, 40.0),
        (3, T0 + 3, 30.0),
        (1, T0 + 9, 12.0),
        (1, T0 + 9, 11.0),
        (1, T0 + 9, 13.0),
        (1, T0 + 4, 10.0),
        (2, T0 + 5, 20.0),
        (0, T0 + 8, 0.0),
        (2, T0 + 0, 21.0),
    ]
    with grpc.insecure_channel(either_sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        experiment_id = stub.CreateExperiment(
            pb.CreateExperimentRequest(name=f"history-order-{unique}")
        ).experiment.experiment_id
        run_id = stub.StartRun(pb.StartRunRequest(experiment_id=experiment_id)).run.info.run_id
        stub.LogMetrics(
            pb.LogMetricsRequest(
                run_id=run_id,
                metrics=[
                    pb.Metric(key="loss", step=s, timestamp_ms=t, value=v) for s, t, v in logged
                ],
            )
        )
        whole = _history(stub, run_id, page_size=1000)
        keys = [(m.step, m.timestamp_ms) for m in whole]
        assert keys == sorted((s, t) for s, t, _ in logged)
        assert sorted(m.value for m in whole) == sorted(v for _, _, v in logged)
        for page_size in (1, 2, 3, 4):
            paged = _history(stub, run_id, page_size)
            assert [(m.step, m.timestamp_ms, m.value) for m in paged] == [
                (m.step, m.timestamp_ms, m.value) for m in whole
            ], page_size
