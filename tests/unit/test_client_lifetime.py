"""A container's channel lives as long as any client it handed out; a closed client says
so with our own error (CLIENT_CLOSED), never gRPC's ValueError. Against a real in-process
gRPC server."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer, MetricStream, ModelRegistry
from mlflow_sidecar.client.channel import SharedChannel
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.client.settings import ClientSettings
from mlflow_sidecar.core.errors import FailedPreconditionError
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc


class _Tracking(pb_grpc.ExperimentTrackingServiceServicer):
    """Just enough of the sidecar: GetExperiment, StreamMetrics, DownloadArtifact."""

    def __init__(self) -> None:
        self.points = 0

    def GetExperiment(self, request, context):
        return pb.GetExperimentResponse(
            experiment=pb.Experiment(experiment_id=request.experiment_id, name="exp")
        )

    def StreamMetrics(self, request_iterator, context):
        accepted = 0
        for message in request_iterator:
            accepted += sum(len(s.values) for s in message.series) + len(message.points)
        self.points += accepted
        return pb.StreamMetricsResponse(accepted_points=accepted)

    def DownloadArtifact(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such artifact")


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ExperimentTrackingServiceServicer_to_server(_Tracking(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _container(target: str) -> ClientContainer:
    container = ClientContainer()
    container.config.from_dict({"target": target, "timeout_s": 10})
    return container


def _clients_of_a_dropped_container(target: str) -> tuple[GrpcExperimentTracking, MetricStream]:
    container = _container(target)
    return container.experiment_tracking(), container.metric_stream()


def test_clients_outlive_the_container_that_made_them(target: str) -> None:
    tracking, stream = _clients_of_a_dropped_container(target)
    gc.collect()  # the container is gone
    assert tracking.get_experiment("7").experiment_id == "7"
    stream.log("run", "loss", 1.0, step=1)
    assert stream.close(timeout_s=30) == 1
    assert tracking.get_experiment("8").name == "exp"


def test_the_channel_closes_when_its_last_client_is_gone(target: str) -> None:
    container = _container(target)
    tracking = container.experiment_tracking()
    stream = container.metric_stream()
    shared = weakref.ref(container.shared_channel())
    raw = weakref.ref(container.shared_channel()._raw)
    assert tracking.get_experiment("1").experiment_id == "1"
    stream.close()
    del container
    gc.collect()
    assert shared() is not None and raw() is not None  # the clients still hold it
    del tracking, stream
    gc.collect()
    assert shared() is None and raw() is None


def test_calls_after_shutdown_raise_client_closed(target: str, tmp_path) -> None:
    container = _container(target)
    tracking = container.experiment_tracking()
    stream = container.metric_stream()
    stream.log("run", "loss", 1.0, step=1)
    assert stream.flush(timeout_s=30) == 1
    container.shutdown_resources()

    calls = [
        lambda: tracking.get_experiment("1"),  # unary
        lambda: tracking.download_artifact("run", "a.txt", tmp_path),  # server stream
        lambda: tracking.upload_artifact("run", __file__, "a.py"),  # client stream
    ]
    for call in calls:
        with pytest.raises(FailedPreconditionError) as err:
            call()
        assert err.value.reason == "CLIENT_CLOSED"
    stream.log("run", "loss", 2.0, step=2)
    with pytest.raises(FailedPreconditionError) as err:
        stream.flush(timeout_s=30)
    assert err.value.reason == "CLIENT_CLOSED"
    with pytest.raises(FailedPreconditionError) as err:
        stream.log("run", "loss", 3.0, step=3)
    assert err.value.reason == "CLIENT_CLOSED"


def test_a_closed_stream_says_client_closed(target: str) -> None:
    container = _container(target)
    stream = container.metric_stream()
    stream.close()
    with pytest.raises(FailedPreconditionError) as err:
        stream.log("run", "loss", 1.0)
    assert err.value.reason == "CLIENT_CLOSED"
    container.shutdown_resources()


def test_threads_first_using_a_container_share_one_client_and_channel(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[SharedChannel] = []
    open_channel = SharedChannel.__init__

    def counting_init(self: SharedChannel, settings: ClientSettings) -> None:
        opened.append(self)
        open_channel(self, settings)

    monkeypatch.setattr(SharedChannel, "__init__", counting_init)
    container = _container(target)
    threads = 16
    barrier = threading.Barrier(threads)
    tracking: list[GrpcExperimentTracking] = []
    registries: list[ModelRegistry] = []

    def first_use() -> None:
        barrier.wait(timeout=30)
        tracking.append(container.experiment_tracking())
        registries.append(container.model_registry())

    workers = [threading.Thread(target=first_use) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    assert len(tracking) == threads and len(registries) == threads
    assert len({id(client) for client in tracking}) == 1
    assert len({id(client) for client in registries}) == 1
    assert len(opened) == 1
    container.shutdown_resources()
    for client in tracking:
        with pytest.raises(FailedPreconditionError) as err:
            client.get_experiment("1")
        assert err.value.reason == "CLIENT_CLOSED"
    assert opened[0].closed
