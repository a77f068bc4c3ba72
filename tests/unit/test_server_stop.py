"""Stopping the sidecar ends, whatever a step of it meets, within the grace period."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc
import pytest

from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.grpc_server import SidecarServer
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2, tracking_pb2_grpc


class _Task:
    def __init__(self, *, fails: bool = False) -> None:
        self.fails = fails
        self.stopped_with: float | None = None

    def start(self) -> None:
        """Nothing to begin."""

    def stop(self, timeout_s: float) -> None:
        self.stopped_with = timeout_s
        if self.fails:
            raise RuntimeError("a background task that fails to stop")


class _Spool:
    """A drain that has `left` points and `ends` run ends whatever it is given."""

    def __init__(self, left: int, ends: int = 0) -> None:
        self.left = left
        self.ends = ends

    def wait_delivered(self, run_id: str, timeout_s: float) -> int:
        return self.left

    def ends_left(self) -> int:
        return self.ends


def _server(tmp_path, tasks, drain=None) -> SidecarServer:
    config = load_config(data_dir=tmp_path, server={"port": 0, "grace_s": 7.0})
    server = SidecarServer(
        config,
        tracking_pb2_grpc.ExperimentTrackingServiceServicer(),
        registry_pb2_grpc.ModelRegistryServiceServicer(),
        background=tasks,
        drain=drain,
    )
    server.start()
    return server


def test_a_step_that_fails_does_not_keep_the_sidecar_from_stopping(tmp_path, caplog):
    failing, other = _Task(fails=True), _Task()
    server = _server(tmp_path, [other, failing])
    threading.Thread(target=server.stop, daemon=True).start()
    waiter = threading.Thread(target=server.wait, daemon=True)
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive(), "wait() never returned"
    assert "stopping failed" in caplog.text


def test_background_tasks_get_what_is_left_of_the_grace_period(tmp_path, caplog):
    task = _Task()
    server = _server(tmp_path, [task], drain=_Spool(left=12))
    server.stop()
    assert task.stopped_with is not None and 0 < task.stopped_with <= 7.0
    assert "12 metric points are left in the spool" in caplog.text


def test_run_ends_left_in_the_spool_are_said_even_when_every_point_was_delivered(tmp_path, caplog):
    server = _server(tmp_path, [], drain=_Spool(left=0, ends=2))
    server.stop()
    assert "every accepted metric point was delivered before stopping" in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("2 run ends recorded by EndRun are left in the spool" in e for e in errors)


@pytest.fixture(autouse=True)
def _logs(caplog):
    caplog.set_level("INFO")


class _ReadingTracking(tracking_pb2_grpc.ExperimentTrackingServiceServicer):
    """UploadArtifact reads its request stream to the end, as the real one does."""

    def __init__(self) -> None:
        self.reading = threading.Event()

    def UploadArtifact(self, request_iterator, context):
        for _ in request_iterator:
            self.reading.set()
        return tracking_pb2.UploadArtifactResponse()


def test_a_call_the_grace_period_cuts_off_is_unavailable_in_log_and_metrics(tmp_path, caplog):
    config = load_config(data_dir=tmp_path, server={"port": 0, "grace_s": 0.5})
    tracking = _ReadingTracking()
    server = SidecarServer(config, tracking, registry_pb2_grpc.ModelRegistryServiceServicer())
    server.start()
    done_sending = threading.Event()

    def slow_upload() -> Iterator[tracking_pb2.UploadArtifactRequest]:
        yield tracking_pb2.UploadArtifactRequest(chunk=b"c")
        done_sending.wait(60)

    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)
            call = stub.UploadArtifact.future(slow_upload(), metadata=(("x-request-id", "cut-1"),))
            assert tracking.reading.wait(60), "the upload never reached its handler"
            server.stop()
            with pytest.raises(grpc.RpcError) as ended:
                call.result(timeout=60)
    finally:
        done_sending.set()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    lines = [r for r in caplog.records if r.name == "mlflow_sidecar.access"]
    assert [(r.levelno, r.grpc_code) for r in lines] == [(logging.WARNING, "UNAVAILABLE")]
    assert "cut off by the shutdown" in lines[0].getMessage()

    def handled(code: str) -> float | None:
        labels = {
            "grpc_type": "client_stream",
            "grpc_service": "mlflow_sidecar.v1.ExperimentTrackingService",
            "grpc_method": "UploadArtifact",
            "grpc_code": code,
        }
        return server.metrics.registry.get_sample_value("grpc_server_handled_total", labels)

    assert handled("UNAVAILABLE") == 1
    assert handled("CANCELLED") is None
    assert handled("OK") is None
