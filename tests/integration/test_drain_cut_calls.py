"""A call still running when the stop's grace period is over: the client is answered
UNAVAILABLE, and the access log says so, once, before the process ends."""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.sidecar_process import SidecarProcess

REQUEST_ID = "cut-upload-1"
CHUNKS = 40
CHUNK = b"c" * 1000


def _slow_upload(run_id: str, sending: threading.Event, stop: threading.Event) -> Iterator[Any]:
    """An upload that sends one chunk every 0.3 s, far past the 3 s grace period."""
    data = CHUNK * CHUNKS
    yield pb.UploadArtifactRequest(
        header=pb.UploadArtifactHeader(
            run_id=run_id,
            artifact_path="slow.bin",
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
    )
    for index in range(CHUNKS):
        if index == 3:
            sending.set()  # well into the call: the sidecar is handling it
        if stop.wait(0.3):
            return
        yield pb.UploadArtifactRequest(chunk=CHUNK)


def test_a_call_the_drain_cuts_off_is_logged_once_as_unavailable(mlflow_server, tmp_path):
    sidecar = SidecarProcess(
        tmp_path / "data",
        mlflow_server.url,
        stdout_path=tmp_path / "stdout",
        MLFLOW_SIDECAR__SERVER__GRACE_S="3",
        MLFLOW_SIDECAR__LOG_FORMAT="json",
    )
    sidecar.start()
    seen: dict[str, object] = {}
    sending, stop_sending = threading.Event(), threading.Event()
    try:
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            experiment = stub.CreateExperiment(
                pb.CreateExperimentRequest(name=f"cut-{tmp_path.name}", get_if_exists=True)
            ).experiment
            run = stub.StartRun(pb.StartRunRequest(experiment_id=experiment.experiment_id)).run

            def upload() -> None:
                try:
                    stub.UploadArtifact(
                        _slow_upload(run.info.run_id, sending, stop_sending),
                        timeout=60,
                        metadata=(("x-request-id", REQUEST_ID),),
                    )
                    seen["code"] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    seen["code"] = exc.code()

            uploader = threading.Thread(target=upload)
            uploader.start()
            assert sending.wait(60), "the upload never got going"
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGTERM)
            uploader.join(60)
            assert not uploader.is_alive(), "the upload never ended"
            assert sidecar.proc.wait(timeout=60) == 0, sidecar.log_tail()
    finally:
        stop_sending.set()
        sidecar.kill()
    assert seen["code"] == grpc.StatusCode.UNAVAILABLE, seen
    records = [json.loads(line) for line in sidecar.log_path.read_text().splitlines() if line]
    access = [
        r
        for r in records
        if r["logger"] == "mlflow_sidecar.access" and r["request_id"] == REQUEST_ID
    ]
    assert len(access) == 1, sidecar.log_tail()
    assert access[0]["grpc_method"] == "UploadArtifact"
    assert access[0]["grpc_code"] == "UNAVAILABLE"
    assert access[0]["level"] == "WARNING"
    assert "cut off by the shutdown" in access[0]["message"]


def test_a_metric_stream_ends_at_its_next_message_with_its_trailer_when_the_sidecar_stops(
    mlflow_server, tmp_path
):
    # grpc would cut a stream still sending at the end of the grace period, trailer and
    # all; the sidecar ends it first, at a message, saying what the spool holds.
    sidecar = RunningSidecar(sidecar_config(tmp_path, mlflow_server.url))
    outbox: queue.Queue[pb.StreamMetricsRequest | None] = queue.Queue()

    def messages() -> Iterator[pb.StreamMetricsRequest]:
        while (message := outbox.get()) is not None:
            yield message

    def points(first: int) -> pb.StreamMetricsRequest:
        return pb.StreamMetricsRequest(
            points=[
                pb.MetricPoint(run_id=run_id, key="loss", value=1.0, timestamp_ms=5, step=step)
                for step in range(first, first + 10)
            ]
        )

    stopping: threading.Thread | None = None
    try:
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            experiment = stub.CreateExperiment(
                pb.CreateExperimentRequest(name=f"stopping-{tmp_path.name}")
            ).experiment.experiment_id
            run_id = stub.StartRun(pb.StartRunRequest(experiment_id=experiment)).run.info.run_id
            call = stub.StreamMetrics.future(messages(), timeout=60)
            outbox.put(points(0))
            # Accepted once MLflow has its points (the spool delivers what it accepted).
            history = pb.GetMetricHistoryRequest(run_id=run_id, metric_key="loss")
            deadline = time.monotonic() + 30
            while len(stub.GetMetricHistory(history).metrics) < 10:
                assert time.monotonic() < deadline, "the first message was never accepted"
                time.sleep(0.05)
            stopping = threading.Thread(target=sidecar.server.stop, args=(10.0,))
            stopping.start()
            deadline = time.monotonic() + 30
            while not sidecar.container.stream_shutdown().ending:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            outbox.put(points(10))
            with pytest.raises(grpc.RpcError) as ended:
                call.result(timeout=30)
    finally:
        outbox.put(None)
        if stopping is not None:
            stopping.join(30)
        else:
            sidecar.stop()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    error = error_from_rpc(ended.value)
    assert error.reason == ErrorReason.SHUTTING_DOWN
    trailer = dict(ended.value.trailing_metadata() or ())
    assert trailer["accepted-points"] == "10"
