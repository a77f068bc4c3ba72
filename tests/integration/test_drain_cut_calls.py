"""A call still running when the stop's grace period is over: the client is answered
UNAVAILABLE, and the access log says so, once, before the process ends."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
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
