"""One writer per artifact path: an upload whose caller got DEADLINE_EXCEEDED while its
store was under way may still land, but never after a newer upload of the same path that
was acknowledged OK. The newer upload waits until the older store's outcome is known.

The store is held back by a wrapper around the real one (the file store of the embedded
sidecar, the PUT to MLflow's artifact proxy), so the order is decided by the test, not by
timing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.mlflow_gateway import mlflow_internals
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.integration.test_artifact_streaming import CHUNK, sha, upload_requests

WRITERS_LOG = "mlflow_sidecar.server.artifact_writers"
# The late upload's deadline: long enough to reach its store on a loaded machine.
LATE_DEADLINE_S = 5.0
WAIT_S = 120.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after WAIT_S."""
    give_up = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting: {what}")
        time.sleep(0.05)


class HeldFirstStore:
    """Stores in order of arrival, except that the first one waits for `release` (it has
    begun: its outcome comes whatever its caller's deadline says) and what each did is
    written down as ("begin" | "end", label)."""

    def __init__(self, labels: dict[bytes, str]) -> None:
        self._labels = labels
        self.release = threading.Event()
        self.first_began = threading.Event()
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def label(self, body: bytes) -> str:
        return self._labels.get(body, "?")

    def store(self, body: bytes, do_store: Callable[[], Any]) -> Any:
        with self._lock:
            first = not self.first_began.is_set()
            self.first_began.set()
            self.events.append(("begin", self.label(body)))
        if first:
            self.release.wait(WAIT_S)
        # A store under way goes on after its caller's deadline, as an object store does.
        with call_deadline.deadline_scope(None):
            answer = do_store()
        with self._lock:
            self.events.append(("end", self.label(body)))
        return answer

    def began(self, label: str) -> bool:
        with self._lock:
            return ("begin", label) in self.events


def start_run(stub: pb_grpc.ExperimentTrackingServiceStub, name: str) -> str:
    experiment_id = stub.CreateExperiment(
        pb.CreateExperimentRequest(name=name), timeout=60
    ).experiment.experiment_id
    return stub.StartRun(
        pb.StartRunRequest(experiment_id=experiment_id), timeout=60
    ).run.info.run_id


def downloaded(stub: pb_grpc.ExperimentTrackingServiceStub, run_id: str, path: str) -> bytes:
    answers = stub.DownloadArtifact(
        pb.DownloadArtifactRequest(run_id=run_id, artifact_path=path), timeout=60
    )
    return b"".join(a.chunk for a in answers if a.WhichOneof("payload") == "chunk")


def late_then_newer(
    stub: pb_grpc.ExperimentTrackingServiceStub,
    held: HeldFirstStore,
    run_id: str,
    path: str,
    late: bytes,
    newer: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Upload `late` until DEADLINE_EXCEEDED while its store is held, then `newer` to the
    same path; `newer` must not be stored while `late`'s store is under way, and is what
    the path holds in the end."""
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadArtifact(upload_requests(run_id, path, late), timeout=LATE_DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert held.first_began.wait(WAIT_S)
    assert held.began("late")

    answers: dict[str, object] = {}

    def upload_newer() -> None:
        try:
            answers["newer"] = stub.UploadArtifact(
                upload_requests(run_id, path, newer), timeout=WAIT_S
            ).sha256
        except grpc.RpcError as exc:
            answers["newer"] = exc.code()

    def newer_waits() -> bool:
        return any(r.name == WRITERS_LOG and "waits" in r.getMessage() for r in caplog.records)

    thread = threading.Thread(target=upload_newer)
    thread.start()
    try:
        wait_until(
            lambda: held.began("newer") or newer_waits(),
            "the newer upload neither waited for the path nor stored",
        )
        assert not held.began("newer"), "the newer upload was stored while the late one was"
    finally:
        held.release.set()
        thread.join(WAIT_S)
    assert answers == {"newer": sha(newer)}
    assert held.events == [("begin", "late"), ("end", "late"), ("begin", "newer"), ("end", "newer")]
    assert downloaded(stub, run_id, path) == newer


def test_an_upload_stored_past_its_deadline_never_lands_over_a_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A sidecar that writes artifact files itself (here its embedded store)."""
    running = RunningSidecar(sidecar_config(tmp_path / "sidecar", ""))
    late, newer = os.urandom(CHUNK + 3), os.urandom(CHUNK + 3)
    held = HeldFirstStore({late: "late", newer: "newer"})
    gateway = running.container.gateway()
    log_artifact = gateway.log_artifact

    def held_log_artifact(run_id: str, local_file: Path, artifact_dir: str) -> None:
        held.store(local_file.read_bytes(), lambda: log_artifact(run_id, local_file, artifact_dir))

    monkeypatch.setattr(gateway, "log_artifact", held_log_artifact)
    try:
        with (
            caplog.at_level(logging.INFO, logger=WRITERS_LOG),
            grpc.insecure_channel(running.target) as channel,
        ):
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            run_id = start_run(stub, "late-store")
            late_then_newer(stub, held, run_id, "ckpt/model.bin", late, newer, caplog)
    finally:
        held.release.set()
        running.stop()


def test_a_streamed_upload_answered_past_its_deadline_never_lands_over_a_newer_one(
    mlflow_server: Any,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sidecar that streams uploads to MLflow's artifact proxy: MLflow's server has the
    late upload's whole body and has not answered yet when its caller's deadline passes."""
    running = RunningSidecar(sidecar_config(tmp_path / "sidecar", mlflow_server.url))
    late, newer = os.urandom(2 * CHUNK + 3), os.urandom(2 * CHUNK + 3)
    held = HeldFirstStore({late: "late", newer: "newer"})
    http_request = mlflow_internals.http_request

    def held_put(*args: Any, **kwargs: Any) -> Any:
        if args[2] != "PUT":
            return http_request(*args, **kwargs)
        # The body as MLflow's server receives it: whole once the sidecar commits.
        body = b"".join(kwargs.pop("data"))
        return held.store(body, lambda: http_request(*args, data=body, **kwargs))

    monkeypatch.setattr(mlflow_internals, "http_request", held_put)
    try:
        with (
            caplog.at_level(logging.INFO, logger=WRITERS_LOG),
            grpc.insecure_channel(running.target) as channel,
        ):
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            run_id = start_run(stub, f"late-put-{unique}")
            late_then_newer(stub, held, run_id, "ckpt/model.bin", late, newer, caplog)
    finally:
        held.release.set()
        running.stop()
