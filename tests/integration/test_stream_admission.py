"""`server.max_streaming_rpcs`: streams beyond it are refused at once, unary calls never
wait behind the streams in progress, and the typed metric stream outlasts a refusal."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import mlflow
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.processes import MlflowServer

STREAMS = 2
# Generous: the calls must succeed, however slow the machine is; how fast is bench's job.
DEADLINE_S = 60


@pytest.fixture(scope="module")
def small_sidecar(
    mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningSidecar]:
    config = sidecar_config(
        tmp_path_factory.mktemp("small-sidecar"),
        mlflow_server.url,
        server={"workers": STREAMS + 2, "max_streaming_rpcs": STREAMS},
    )
    running = RunningSidecar(config)
    yield running
    running.stop()


@pytest.fixture()
def stub(small_sidecar: RunningSidecar) -> Iterator[pb_grpc.ExperimentTrackingServiceStub]:
    with grpc.insecure_channel(small_sidecar.target) as channel:
        yield pb_grpc.ExperimentTrackingServiceStub(channel)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


class IdleStreams:
    """StreamMetrics calls that send nothing and stay open until released."""

    def __init__(self, stub: pb_grpc.ExperimentTrackingServiceStub, sidecar: RunningSidecar):
        self._stub = stub
        self._sidecar = sidecar
        self._calls: list[tuple[threading.Event, grpc.Future]] = []

    def open(self, count: int) -> None:
        slots = self._sidecar.server.stream_slots
        wanted = slots.in_use + count
        for _ in range(count):
            release = threading.Event()
            call = self._stub.StreamMetrics.future(_idle(release), timeout=DEADLINE_S)
            self._calls.append((release, call))
        wait_until(lambda: slots.in_use == wanted, f"{wanted} streams in progress")

    def close_one(self) -> pb.StreamMetricsResponse:
        release, call = self._calls.pop()
        release.set()
        reply: pb.StreamMetricsResponse = call.result()
        return reply

    def close_all(self) -> None:
        while self._calls:
            self.close_one()


def _idle(release: threading.Event) -> Iterator[pb.StreamMetricsRequest]:
    release.wait(DEADLINE_S)
    yield from ()


@pytest.fixture()
def idle_streams(
    stub: pb_grpc.ExperimentTrackingServiceStub, small_sidecar: RunningSidecar
) -> Iterator[IdleStreams]:
    streams = IdleStreams(stub, small_sidecar)
    yield streams
    streams.close_all()


def refused_count(sidecar: RunningSidecar) -> float:
    value = sidecar.server.metrics.registry.get_sample_value("mlflow_sidecar_streams_refused_total")
    return value or 0.0


def test_a_full_stream_limit_refuses_the_next_stream_but_no_unary_call(
    stub, small_sidecar, idle_streams, unique
):
    experiment_id = stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"admission-{unique}"), timeout=DEADLINE_S
    ).experiment.experiment_id
    run_id = stub.StartRun(
        pb.StartRunRequest(experiment_id=experiment_id), timeout=DEADLINE_S
    ).run.info.run_id
    idle_streams.open(STREAMS)
    refused_before = refused_count(small_sidecar)

    # Every worker but the streams' is free for unary calls, health checks among them.
    assert stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=DEADLINE_S).run.info.run_id
    made = stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"admission-more-{unique}"), timeout=DEADLINE_S
    )
    assert made.experiment.experiment_id
    with grpc.insecure_channel(small_sidecar.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    # One stream more, of either shape, is refused at once with the reason and a hint.
    point = pb.MetricPoint(run_id=run_id, key="refused", value=1.0, step=0)
    with pytest.raises(grpc.RpcError) as refused:
        stub.StreamMetrics(iter([pb.StreamMetricsRequest(points=[point])]), timeout=DEADLINE_S)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = error_from_rpc(refused.value)
    assert error.reason == ErrorReason.TOO_MANY_STREAMS
    assert "server.max_streaming_rpcs" in error.message
    assert error.metadata == {"max_streaming_rpcs": str(STREAMS)}
    assert error.retry_after_s
    with pytest.raises(grpc.RpcError) as download:
        list(
            stub.DownloadArtifact(
                pb.DownloadArtifactRequest(run_id=run_id, artifact_path="none.txt"),
                timeout=DEADLINE_S,
            )
        )
    assert error_from_rpc(download.value).reason == ErrorReason.TOO_MANY_STREAMS
    assert refused_count(small_sidecar) == refused_before + 2

    # Once a stream has ended, the next one is admitted.
    assert idle_streams.close_one().accepted_points == 0
    wait_until(lambda: small_sidecar.server.stream_slots.in_use == STREAMS - 1, "a free slot")
    reply = stub.StreamMetrics(iter([pb.StreamMetricsRequest(points=[point])]), timeout=DEADLINE_S)
    assert reply.accepted_points == 1


def test_the_typed_metric_stream_outlasts_a_refusal_and_delivers_each_point_once(
    small_sidecar, idle_streams, mlflow_server, unique
):
    container = ClientContainer()
    container.config.from_dict({"target": small_sidecar.target, "timeout_s": DEADLINE_S})
    tracking = container.experiment_tracking()
    experiment_id = tracking.create_experiment(f"admission-typed-{unique}").experiment_id
    run_id = tracking.start_run(experiment_id).run_id
    idle_streams.open(STREAMS)
    refused_before = refused_count(small_sidecar)
    steps = 500
    try:
        stream = container.metric_stream()
        for step in range(steps):
            stream.log(run_id, "reward", float(step), step=step)
        wait_until(lambda: refused_count(small_sidecar) > refused_before, "a refused stream")
        idle_streams.close_all()
        assert stream.close(timeout_s=DEADLINE_S) == steps
        assert tracking.flush_metrics(run_id, timeout_s=DEADLINE_S).pending_points == 0
    finally:
        container.shutdown_resources()
    history = mlflow.MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(
        run_id, "reward"
    )
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(steps)]
