"""A metric stream and a channel belong to the process that made them: in a child forked
by multiprocessing's `fork` start method, using them raises our own error at once instead
of hanging; the parent's go on as before, and a new container in the child works."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import SidecarError
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

_FORK = multiprocessing.get_context("fork")


class _Tracking(pb_grpc.ExperimentTrackingServiceServicer):
    def GetExperiment(self, request, context):
        return pb.GetExperimentResponse(experiment=pb.Experiment(experiment_id="1", name="exp"))

    def StreamMetrics(self, request_iterator, context):
        accepted = sum(len(s.values) for m in request_iterator for s in m.series)
        return pb.StreamMetricsResponse(accepted_points=accepted)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ExperimentTrackingServiceServicer_to_server(_Tracking(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _in_child(work: Callable[[], Any]) -> str:
    """Run `work` in a forked child; the reason of the SidecarError it raised, or 'ok'."""
    queue = _FORK.Queue()

    def child() -> None:
        try:
            work()
            queue.put("ok")
        except SidecarError as exc:
            queue.put(exc.reason)
        except BaseException as exc:
            queue.put(f"{type(exc).__name__}: {exc}")

    process = _FORK.Process(target=child)
    process.start()
    try:
        return str(queue.get(timeout=60))
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()


def test_a_stream_and_a_channel_refuse_work_in_a_forked_child(target: str) -> None:
    container = ClientContainer()
    container.config.from_dict({"target": target, "timeout_s": 10})
    tracking = container.experiment_tracking()
    stream = container.metric_stream()
    stream.log("run", "reward", 1.0, step=1)
    assert stream.flush(timeout_s=30) == 1
    stream.log("run", "reward", 2.0, step=2)  # buffered when the child is forked

    assert _in_child(lambda: stream.log("run", "reward", 3.0, step=3)) == "STREAM_USED_AFTER_FORK"
    assert _in_child(lambda: stream.flush(timeout_s=5)) == "STREAM_USED_AFTER_FORK"
    assert _in_child(lambda: tracking.get_experiment("1")) == "CHANNEL_USED_AFTER_FORK"

    # The parent's stream and channel are untouched.
    stream.log("run", "reward", 4.0, step=4)
    assert stream.close(timeout_s=30) == 3
    assert tracking.get_experiment("1").name == "exp"
    container.shutdown_resources()


def test_a_new_container_in_the_child_works(target: str) -> None:
    parent = ClientContainer()
    parent.config.from_dict({"target": target, "timeout_s": 10})
    assert parent.experiment_tracking().get_experiment("1").name == "exp"

    def fresh() -> None:
        container = ClientContainer()
        container.config.from_dict({"target": target, "timeout_s": 10})
        with container.metric_stream() as stream:
            stream.log("run", "reward", 1.0, step=1)
        assert stream.accepted == 1
        container.shutdown_resources()

    assert _in_child(fresh) == "ok"
    parent.shutdown_resources()
