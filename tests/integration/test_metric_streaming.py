"""StreamMetrics, FlushMetrics and the spool against a real mlflow server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import mlflow
import pytest

from mlflow_sidecar.client import MetricPoint, RunStatus
from mlflow_sidecar.core.conversions import ACCEPTED_POINTS_METADATA, SERIES_COLUMNS_METADATA
from mlflow_sidecar.core.errors import (
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    error_from_rpc,
)
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config

CLI = str(Path(sys.executable).with_name("mlflow-sidecar"))


def full_history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_metric_stream_then_end_run_gives_the_whole_history(
    client_container, mlflow_server, unique
):
    tracking = client_container.experiment_tracking()
    exp = tracking.create_experiment(f"stream-{unique}").experiment_id
    runs = [tracking.start_run(exp, run_name=f"r{i}").run_id for i in range(3)]
    with client_container.metric_stream() as stream:
        for step in range(2000):
            for run_id in runs:
                stream.log_metrics(run_id, {"reward": float(step), "loss": -float(step)}, step=step)
    assert stream.accepted == 2000 * 3 * 2

    # EndRun waiting for delivery: the run is ended and its history complete right after.
    ended = tracking.end_run(runs[0], RunStatus.FINISHED, wait_for_delivery=True)
    assert ended.info.status is RunStatus.FINISHED
    history = tracking.get_metric_history(runs[0], "reward", page_size=5000)
    assert [m.step for m in history.items] == list(range(2000))

    # EndRun without waiting: the end is recorded and follows the run's last point.
    tracking.end_run(runs[1], RunStatus.KILLED)
    assert tracking.flush_metrics(timeout_s=60).pending_points == 0
    assert tracking.get_run(runs[1]).info.status is RunStatus.KILLED
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    for run_id in runs:
        assert full_history(plain, run_id, "loss") == [(s, -float(s)) for s in range(2000)]


@pytest.mark.parametrize("bad", ["bad@key", "loss\n", "a//b", "a/", "./a", "../a", ""])
def test_a_key_the_sidecar_would_refuse_raises_at_log_and_the_good_points_arrive(
    client_container, mlflow_server, unique, bad
):
    # Refused in the message, it would have failed the stream and every good point with it.
    tracking = client_container.experiment_tracking()
    run_id = tracking.start_run(tracking.create_experiment(f"keys-{unique}").experiment_id).run_id
    with client_container.metric_stream() as stream:
        for step in range(500):
            stream.log(run_id, "loss", float(step), step=step)
            if step == 250:
                with pytest.raises(InvalidArgumentError) as err:
                    stream.log(run_id, bad, 1.0, step=step)
                assert err.value.field == "key"
    assert stream.accepted == 500
    assert tracking.flush_metrics(run_id, timeout_s=60).pending_points == 0
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    assert full_history(plain, run_id, "loss") == [(s, float(s)) for s in range(500)]


def test_flush_metrics_rpc_and_enqueue(tracking_stub, client_container, unique):
    tracking = client_container.experiment_tracking()
    exp = tracking.create_experiment(f"enqueue-{unique}").experiment_id
    run_id = tracking.start_run(exp).run_id
    accepted = tracking.enqueue_metrics(
        [MetricPoint(run_id, "q", float(i), 0, i) for i in range(1500)]
    )
    assert accepted == 1500
    reply = tracking_stub.FlushMetrics(pb.FlushMetricsRequest(run_id=run_id), timeout=60)
    assert reply.pending_points == 0 and reply.dead_letter_points == 0
    assert len(tracking.get_metric_history(run_id, "q", page_size=5000).items) == 1500
    assert tracking.flush_metrics(run_id, timeout_s=0).complete


def test_stream_rejects_bad_points_and_reports_what_was_accepted(tracking_stub):
    good = pb.StreamMetricsRequest(points=[pb.MetricPoint(run_id="r" * 32, key="ok", value=1)])
    bad = pb.StreamMetricsRequest(points=[pb.MetricPoint(run_id="r" * 32, key="", value=1)])
    with pytest.raises(grpc.RpcError) as err:
        tracking_stub.StreamMetrics(iter([good, good, bad, good]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_from_rpc(err.value).field == "points[0].key"
    assert dict(err.value.trailing_metadata())[ACCEPTED_POINTS_METADATA] == "2"


def test_points_and_series_of_one_message_all_reach_mlflow(tracking_stub, mlflow_server, unique):
    exp = tracking_stub.CreateExperiment(pb.CreateExperimentRequest(name=f"series-{unique}"))
    run_id = tracking_stub.StartRun(
        pb.StartRunRequest(experiment_id=exp.experiment.experiment_id)
    ).run.info.run_id
    message = pb.StreamMetricsRequest(
        points=[pb.MetricPoint(run_id=run_id, key="loss", value=0.5, timestamp_ms=1000, step=0)],
        series=[
            pb.MetricSeries(
                run_id=run_id,
                key="reward",
                values=[float(i) for i in range(3000)],
                timestamps_ms=[0] * 3000,  # stamped on arrival
                steps=list(range(3000)),
            ),
            pb.MetricSeries(
                run_id=run_id, key="loss", values=[0.25], timestamps_ms=[2000], steps=[1]
            ),
        ],
    )
    reply = tracking_stub.StreamMetrics(iter([message]))
    assert reply.accepted_points == 3002
    flushed = tracking_stub.FlushMetrics(pb.FlushMetricsRequest(run_id=run_id), timeout=60)
    assert flushed.pending_points == 0 and flushed.dead_letter_points == 0
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    assert full_history(plain, run_id, "reward") == [(i, float(i)) for i in range(3000)]
    assert all(m.timestamp > 0 for m in plain.get_metric_history(run_id, "reward"))
    assert full_history(plain, run_id, "loss") == [(0, 0.5), (1, 0.25)]


def test_fixed_width_columns_reach_mlflow_as_sent_and_the_sidecar_says_it_reads_them(
    tracking_stub, mlflow_server, unique
):
    exp = tracking_stub.CreateExperiment(pb.CreateExperimentRequest(name=f"fixed-{unique}"))
    run_id = tracking_stub.StartRun(
        pb.StartRunRequest(experiment_id=exp.experiment.experiment_id)
    ).run.info.run_id
    stamps = [1_764_000_000_000 + i for i in range(2000)]
    message = pb.StreamMetricsRequest(
        series=[
            pb.MetricSeries(
                run_id=run_id,
                key="reward",
                values=[i / 3 for i in range(2000)],
                fixed_timestamps_ms=stamps,
                fixed_steps=[i - 1000 for i in range(2000)],
            ),
            # One column in each form.
            pb.MetricSeries(
                run_id=run_id, key="loss", values=[0.25], fixed_timestamps_ms=[5], steps=[3]
            ),
        ]
    )
    reply, call = tracking_stub.StreamMetrics.with_call(iter([message]))
    assert reply.accepted_points == 2001
    assert "fixed64" in dict(call.initial_metadata())[SERIES_COLUMNS_METADATA].split(",")
    flushed = tracking_stub.FlushMetrics(pb.FlushMetricsRequest(run_id=run_id), timeout=60)
    assert flushed.pending_points == 0 and flushed.dead_letter_points == 0
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    reward = sorted(
        (m.step, m.timestamp, m.value) for m in plain.get_metric_history(run_id, "reward")
    )
    assert reward == [(i - 1000, stamps[i], i / 3) for i in range(2000)]
    loss = plain.get_metric_history(run_id, "loss")
    assert [(m.step, m.timestamp, m.value) for m in loss] == [(3, 5, 0.25)]


def test_the_typed_stream_sends_fixed_width_columns_to_a_sidecar_that_reads_them(
    client_container, mlflow_server, unique
):
    tracking = client_container.experiment_tracking()
    exp = tracking.create_experiment(f"typed-fixed-{unique}").experiment_id
    run_id = tracking.start_run(exp).run_id
    with client_container.metric_stream() as stream:
        stream.log(run_id, "loss", 0.5, step=0, timestamp_ms=1000)
        stream.flush()  # the first call: the sidecar says what it reads
        assert stream._core._fixed_columns
        for step in range(1, 3000):
            stream.log(run_id, "loss", step / 2, step=step, timestamp_ms=1000 + step)
    assert stream.accepted == 3000
    assert tracking.flush_metrics(run_id, timeout_s=60).pending_points == 0
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    history = sorted(
        (m.step, m.timestamp, m.value) for m in plain.get_metric_history(run_id, "loss")
    )
    assert history == [(0, 1000, 0.5)] + [(s, 1000 + s, s / 2) for s in range(1, 3000)]


@pytest.mark.parametrize(
    ("spoil", "field"),
    [
        (lambda s: s.steps.pop(), "series[0]"),
        (lambda s: setattr(s, "key", "a" * 251), "series[0].key"),
        (lambda s: s.timestamps_ms.__setitem__(1, -1), "series[0].timestamps_ms[1]"),
        (lambda s: s.fixed_steps.extend([0, 1]), "series[0]"),  # steps in both forms
    ],
)
@pytest.mark.parametrize("with_point", [True, False], ids=["with-a-point", "series-only"])
def test_a_bad_series_refuses_its_whole_message(tracking_stub, unique, spoil, field, with_point):
    exp = tracking_stub.CreateExperiment(pb.CreateExperimentRequest(name=f"bad-{unique}"))
    run_id = tracking_stub.StartRun(
        pb.StartRunRequest(experiment_id=exp.experiment.experiment_id)
    ).run.info.run_id
    good = pb.StreamMetricsRequest(
        series=[
            pb.MetricSeries(run_id=run_id, key="ok", values=[1.0], timestamps_ms=[1], steps=[0])
        ]
    )
    # A message of series only is read as numpy columns, one with points the general way.
    bad = pb.StreamMetricsRequest(
        points=[pb.MetricPoint(run_id=run_id, key="first", value=1.0)] if with_point else [],
        series=[
            pb.MetricSeries(
                run_id=run_id, key="k", values=[1.0, 2.0], timestamps_ms=[1, 2], steps=[0, 1]
            )
        ],
    )
    spoil(bad.series[0])
    with pytest.raises(grpc.RpcError) as err:
        tracking_stub.StreamMetrics(iter([good, bad]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_from_rpc(err.value).field == field
    assert dict(err.value.trailing_metadata())[ACCEPTED_POINTS_METADATA] == "1"
    flushed = tracking_stub.FlushMetrics(pb.FlushMetricsRequest(run_id=run_id), timeout=60)
    assert flushed.pending_points == 0
    for key in ("first", "k"):  # nothing of the refused message, its good parts neither
        history = tracking_stub.GetMetricHistory(
            pb.GetMetricHistoryRequest(run_id=run_id, metric_key=key)
        )
        assert list(history.metrics) == []


def test_points_of_deleted_runs_are_dead_lettered_and_visible(
    sidecar, tracking_stub, mlflow_server, unique
):
    exp = tracking_stub.CreateExperiment(pb.CreateExperimentRequest(name=f"dead-{unique}"))
    run_id = tracking_stub.StartRun(
        pb.StartRunRequest(experiment_id=exp.experiment.experiment_id)
    ).run.info.run_id
    mlflow.MlflowClient(tracking_uri=mlflow_server.url).delete_run(run_id)
    points = [pb.MetricPoint(run_id=run_id, key="m", value=1.0, step=i) for i in range(25)]
    reply = tracking_stub.StreamMetrics(iter([pb.StreamMetricsRequest(points=points)]))
    assert reply.accepted_points == 25
    flushed = tracking_stub.FlushMetrics(pb.FlushMetricsRequest(run_id=run_id), timeout=60)
    assert flushed.pending_points == 0
    assert flushed.dead_letter_points == 25

    config = sidecar.container.config()
    status = subprocess.run(
        [CLI, "spool", "status", "--json"],
        env={"MLFLOW_SIDECAR__DATA_DIR": str(config.data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(status.stdout)
    groups = [g for g in report["dead_letters"] if g["run_id"] == run_id]
    assert groups and groups[0]["points"] == 25
    assert "FAILED_PRECONDITION" in groups[0]["reason"]


def _runs(server, count: int) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri=server.url)
    exp = client.create_experiment("outage")
    return [client.create_run(exp).info.run_id for _ in range(count)]


def test_backpressure_when_the_spool_is_full(own_mlflow, tmp_path):
    (run_id,) = _runs(own_mlflow, 1)
    own_mlflow.stop()  # nothing drains: the spool fills up
    config = sidecar_config(
        tmp_path / "sidecar", own_mlflow.url, spool={"max_points": 500}, retry={"max_time_s": 1}
    )
    running = RunningSidecar(config)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            messages = [
                pb.StreamMetricsRequest(
                    points=[
                        pb.MetricPoint(run_id=run_id, key="m", value=i * 100 + j, step=i * 100 + j)
                        for j in range(100)
                    ]
                )
                for i in range(8)
            ]
            with pytest.raises(grpc.RpcError) as err:
                stub.StreamMetrics(iter(messages), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(err.value.trailing_metadata())[ACCEPTED_POINTS_METADATA] == "500"
            full = error_from_rpc(err.value)
            assert full.reason == ErrorReason.SPOOL_FULL
            assert full.retry_after_s is not None and full.retry_after_s > 0

            own_mlflow.start()
            flushed = stub.FlushMetrics(pb.FlushMetricsRequest(), timeout=120)
            assert flushed.pending_points == 0
    finally:
        running.stop()
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    assert full_history(plain, run_id, "m") == [(s, float(s)) for s in range(500)]


def test_mlflow_outage_is_invisible_to_the_trainer(own_mlflow, tmp_path):
    import threading
    import time

    runs = _runs(own_mlflow, 2)
    config = sidecar_config(tmp_path / "sidecar", own_mlflow.url, retry={"max_time_s": 1})
    running = RunningSidecar(config)
    from mlflow_sidecar.client import ClientContainer

    container = ClientContainer()
    container.config.from_dict({"target": running.target})
    stream = container.metric_stream()
    steps = 0
    stop = threading.Event()

    def trainer() -> None:
        nonlocal steps
        while not stop.is_set():
            for run_id in runs:
                stream.log(run_id, "reward", float(steps), step=steps)
            steps += 1
            time.sleep(0.002)

    try:
        thread = threading.Thread(target=trainer)
        thread.start()
        time.sleep(1)
        own_mlflow.stop()
        time.sleep(11)  # the trainer keeps logging while MLflow is down
        own_mlflow.start()
        time.sleep(1)
        stop.set()
        thread.join()
        assert stream.close() == steps * len(runs)  # the trainer saw no error
        tracking = container.experiment_tracking()
        assert tracking.flush_metrics(timeout_s=120).pending_points == 0
    finally:
        container.shutdown_resources()
        running.stop()
    assert steps > 1000
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    for run_id in runs:
        assert full_history(plain, run_id, "reward") == [(s, float(s)) for s in range(steps)]


def test_a_spool_smaller_than_a_message_takes_it_in_pieces(mlflow_server, tmp_path, unique):
    """A message of more points than `spool.max_points` can never be accepted: the sidecar
    says so for good (not SPOOL_FULL, which would be retried forever) and announces its
    limit; the typed stream cuts its messages to it, and every point arrives once."""
    from mlflow_sidecar.client import ClientContainer
    from mlflow_sidecar.core.conversions import MAX_MESSAGE_POINTS_METADATA

    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    run_id = plain.create_run(plain.create_experiment(f"small-spool-{unique}")).info.run_id
    running = RunningSidecar(
        sidecar_config(tmp_path / "sidecar", mlflow_server.url, spool={"max_points": 300})
    )
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            too_many = pb.StreamMetricsRequest(
                series=[
                    pb.MetricSeries(
                        run_id=run_id,
                        key="raw",
                        values=[1.0] * 301,
                        timestamps_ms=[0] * 301,
                        steps=range(301),
                    )
                ]
            )
            call = stub.StreamMetrics.future(iter([too_many]), timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                call.result()
            assert dict(call.initial_metadata())[MAX_MESSAGE_POINTS_METADATA] == "300"
            refused = error_from_rpc(err.value)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.reason == ErrorReason.TOO_MANY_POINTS
            assert refused.retry_after_s is None
            assert refused.metadata == {"points": "301", "max_points": "300"}
            assert "spool.max_points=300" in str(refused)

        container = ClientContainer()
        container.config.from_dict({"target": running.target})
        try:
            with container.metric_stream() as stream:
                for step in range(1000):  # due batches of 1000 and more: over the limit
                    stream.log_metrics(run_id, {"a": float(step), "b": -float(step)}, step=step)
            assert stream.accepted == 2000
            tracking = container.experiment_tracking()
            assert tracking.flush_metrics(run_id, timeout_s=120).pending_points == 0
        finally:
            container.shutdown_resources()
    finally:
        running.stop()
    for key, sign in (("a", 1.0), ("b", -1.0)):
        history = plain.get_metric_history(run_id, key)
        assert len(history) == 1000
        assert sorted((m.step, m.value) for m in history) == [(s, sign * s) for s in range(1000)]
    assert plain.get_metric_history(run_id, "raw") == []


def test_a_resumed_run_takes_the_streams_points_again(client_container, unique):
    tracking = client_container.experiment_tracking()
    run_id = tracking.start_run(tracking.create_experiment(f"resume-{unique}").experiment_id).run_id
    with client_container.metric_stream() as stream:
        stream.log(run_id, "reward", 0.0, step=0)
        stream.flush()
        tracking.end_run(run_id, RunStatus.KILLED, wait_for_delivery=True)  # preempted
        stream.log(run_id, "reward", 1.0, step=1)
        with pytest.raises(FailedPreconditionError) as refused:
            stream.flush()
        assert refused.value.reason == "RUN_ENDED"
        with pytest.raises(FailedPreconditionError):
            stream.log(run_id, "reward", 1.0, step=1)
        assert tracking.resume_run(run_id).info.status is RunStatus.RUNNING
        stream.resumed(run_id)
        for step in range(2, 100):
            stream.log(run_id, "reward", float(step), step=step)
    ended = tracking.end_run(run_id, RunStatus.FINISHED, wait_for_delivery=True)
    assert ended.info.status is RunStatus.FINISHED
    history = tracking.get_metric_history(run_id, "reward", page_size=200)
    assert [m.step for m in history.items] == [0, *range(2, 100)]
