"""Stream admission: at most `server.max_streaming_rpcs` streams served, a first-come-
first-served line of `server.max_waiting_streams` more, unary calls never waiting behind
them, streams beyond refused at once, no slot kept by a call that ended, and the typed
metric stream outlasting a refusal."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import mlflow
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.server.stream_admission import StreamSlots
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.processes import MlflowServer

STREAMS = 2
LINE = 1
# Generous: the calls must succeed, however slow the machine is; how fast is bench's job.
DEADLINE_S = 60
# Idle streams stay open for as long as a test needs them, never until their deadline.
IDLE_DEADLINE_S = 600


@pytest.fixture(scope="module")
def small_sidecar(
    mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningSidecar]:
    config = sidecar_config(
        tmp_path_factory.mktemp("small-sidecar"),
        mlflow_server.url,
        server={
            "workers": STREAMS + LINE + 2,
            "max_streaming_rpcs": STREAMS,
            "max_waiting_streams": LINE,
            # A waiting stream waits until a test frees a slot for it, however slow.
            "stream_wait_s": IDLE_DEADLINE_S,
        },
    )
    running = RunningSidecar(config)
    yield running
    running.stop()


@pytest.fixture()
def slots(small_sidecar: RunningSidecar) -> Iterator[StreamSlots]:
    slots = small_sidecar.server.stream_slots
    # Each test starts with every slot free, and leaves none taken.
    wait_until(lambda: (slots.in_use, slots.waiting) == (0, 0), "no stream from before")
    yield slots
    wait_until(lambda: (slots.in_use, slots.waiting) == (0, 0), "every slot given back")


@pytest.fixture()
def stub(small_sidecar: RunningSidecar) -> Iterator[pb_grpc.ExperimentTrackingServiceStub]:
    with grpc.insecure_channel(small_sidecar.target) as channel:
        yield pb_grpc.ExperimentTrackingServiceStub(channel)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


class IdleStream:
    """A StreamMetrics call that sends nothing and stays open until released."""

    def __init__(self, stub: pb_grpc.ExperimentTrackingServiceStub, timeout: float) -> None:
        self._release = threading.Event()
        self.call = stub.StreamMetrics.future(_idle(self._release), timeout=timeout)

    def release(self) -> None:
        """End its requests."""
        self._release.set()

    def close(self) -> pb.StreamMetricsResponse:
        """Release it; its answer once the sidecar has served it."""
        self.release()
        reply: pb.StreamMetricsResponse = self.call.result()
        return reply


def _idle(release: threading.Event) -> Iterator[pb.StreamMetricsRequest]:
    release.wait(IDLE_DEADLINE_S)
    yield from ()


class IdleStreams:
    """Idle streams opened one after the other, each once the sidecar has counted the one
    before (served or waiting), so that their order of arrival is known."""

    def __init__(self, stub: pb_grpc.ExperimentTrackingServiceStub, slots: StreamSlots):
        self._stub = stub
        self._slots = slots
        self.opened: list[IdleStream] = []

    def open(self, *, timeout: float = IDLE_DEADLINE_S) -> IdleStream:
        before = self._slots.in_use + self._slots.waiting
        stream = IdleStream(self._stub, timeout)
        self.opened.append(stream)
        wait_until(
            lambda: self._slots.in_use + self._slots.waiting == before + 1,
            f"stream {len(self.opened)} served or waiting",
        )
        return stream

    def fill(self) -> None:
        """Every slot served and the line full."""
        for _ in range(STREAMS + LINE):
            self.open()
        assert (self._slots.in_use, self._slots.waiting) == (STREAMS, LINE)

    def close_all(self) -> None:
        for stream in self.opened:
            stream.release()
        for stream in self.opened:
            # A test's own stream may have ended as it meant it to (cancelled, expired).
            with contextlib.suppress(grpc.RpcError, grpc.FutureCancelledError):
                stream.call.result()
        self.opened.clear()


@pytest.fixture()
def idle_streams(
    stub: pb_grpc.ExperimentTrackingServiceStub, slots: StreamSlots
) -> Iterator[IdleStreams]:
    streams = IdleStreams(stub, slots)
    yield streams
    streams.close_all()


def refused_count(sidecar: RunningSidecar) -> float:
    value = sidecar.server.metrics.registry.get_sample_value("mlflow_sidecar_streams_refused_total")
    return value or 0.0


@pytest.fixture()
def run_id(stub: pb_grpc.ExperimentTrackingServiceStub, unique: str) -> str:
    experiment_id = stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"admission-{unique}"), timeout=DEADLINE_S
    ).experiment.experiment_id
    run: str = stub.StartRun(
        pb.StartRunRequest(experiment_id=experiment_id), timeout=DEADLINE_S
    ).run.info.run_id
    return run


def test_served_and_waiting_streams_leave_unary_calls_served_and_refuse_one_more(
    stub, small_sidecar, slots, idle_streams, run_id, unique
):
    idle_streams.fill()
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
    assert error.metadata == {"max_streaming_rpcs": str(STREAMS), "max_waiting_streams": "1"}
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

    # Once a served stream has ended, the waiting one is served, and is answered.
    first, _, waiting = idle_streams.opened
    assert first.close().accepted_points == 0
    wait_until(lambda: slots.waiting == 0, "the waiting stream served")
    assert slots.in_use == STREAMS
    assert waiting.close().accepted_points == 0


def test_a_freed_slot_goes_to_the_waiting_stream_not_to_one_that_reopens(stub, slots, idle_streams):
    # A metric stream ends its call every window and opens the next at once: that call
    # must not take the slot from a stream that was already waiting for it.
    first, _ = idle_streams.open(), idle_streams.open()
    waiting = idle_streams.open()
    assert slots.waiting == 1
    assert first.close().accepted_points == 0
    idle_streams.open()  # the reopened call
    assert (slots.in_use, slots.waiting) == (STREAMS, 1)
    # The stream that waited is served: released, it is answered (were it still in line,
    # it would wait there until its wait ran out and be refused).
    assert waiting.close().accepted_points == 0
    wait_until(lambda: slots.waiting == 0, "the reopened call served next")


def test_no_slot_is_kept_by_a_stream_that_ended_however_it_ended(stub, slots, idle_streams, run_id):
    # Cancelled while served, and while waiting in line.
    served = idle_streams.open()
    idle_streams.open()
    waiting = idle_streams.open()
    waiting.call.cancel()
    wait_until(lambda: slots.waiting == 0, "the cancelled waiting stream gone")
    served.call.cancel()
    wait_until(lambda: slots.in_use == STREAMS - 1, "the cancelled served stream's slot")
    idle_streams.close_all()
    wait_until(lambda: slots.in_use == 0, "every slot free")

    # Past its deadline while served.
    expiring = idle_streams.open(timeout=2)
    with pytest.raises(grpc.RpcError) as expired:
        expiring.call.result()
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: slots.in_use == 0, "the expired stream's slot")
    idle_streams.close_all()

    # Failed by the handler: bad input on a client stream, a missing file on a server stream.
    bad = pb.MetricPoint(run_id=run_id, key="", value=1.0, step=0)
    with pytest.raises(grpc.RpcError) as invalid:
        stub.StreamMetrics(iter([pb.StreamMetricsRequest(points=[bad])]), timeout=DEADLINE_S)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as missing:
        list(
            stub.DownloadArtifact(
                pb.DownloadArtifactRequest(run_id=run_id, artifact_path="none.txt"),
                timeout=DEADLINE_S,
            )
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    wait_until(lambda: (slots.in_use, slots.waiting) == (0, 0), "every slot free")

    # A server stream its client cancels at once.
    cancelled_download = stub.DownloadArtifact(
        pb.DownloadArtifactRequest(run_id=run_id, artifact_path="none.txt"), timeout=DEADLINE_S
    )
    cancelled_download.cancel()
    wait_until(lambda: (slots.in_use, slots.waiting) == (0, 0), "every slot free")


def test_the_typed_metric_stream_outlasts_a_refusal_and_delivers_each_point_once(
    small_sidecar, slots, idle_streams, mlflow_server, unique
):
    container = ClientContainer()
    container.config.from_dict({"target": small_sidecar.target, "timeout_s": DEADLINE_S})
    tracking = container.experiment_tracking()
    experiment_id = tracking.create_experiment(f"admission-typed-{unique}").experiment_id
    run_id = tracking.start_run(experiment_id).run_id
    idle_streams.fill()
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


def test_health_watches_hold_no_worker_however_many(small_sidecar, stub, slots, idle_streams):
    """Health's Watch needs no token: were each to hold a worker, anyone reaching the port
    could take them all. Twice as many watches as workers leave every call served."""
    with grpc.insecure_channel(small_sidecar.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
            for _ in range(2 * (STREAMS + LINE + 2))
        ]
        try:
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stub.SearchExperiments(pb.SearchExperimentsRequest(), timeout=DEADLINE_S)
            checked = health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            idle_streams.fill()  # and every stream slot is still there for streams
        finally:
            for watch in watches:
                watch.cancel()


def test_the_gauges_show_the_streams_served_and_waiting(small_sidecar, slots, idle_streams):
    registry = small_sidecar.server.metrics.registry

    def gauges() -> tuple[float | None, float | None]:
        return (
            registry.get_sample_value("mlflow_sidecar_streams_in_progress"),
            registry.get_sample_value("mlflow_sidecar_streams_waiting"),
        )

    assert gauges() == (0, 0)
    seen = []
    for _ in range(STREAMS + LINE):
        idle_streams.open()
        seen.append(gauges())
    assert seen == [(1, 0), (2, 0), (2, 1)]
    idle_streams.close_all()
    wait_until(lambda: gauges() == (0, 0), "the gauges back at zero")
