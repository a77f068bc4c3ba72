"""Artifacts pass through the sidecar while they move: what that must never cost.

An upload is fed to MLflow while it arrives, yet a bad one must not touch what is stored,
and a PUT cut by MLflow going away must leave nothing and say UNAVAILABLE, which the typed
client answers by sending the file again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import mlflow
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import InvalidArgumentError, NotFoundError, error_from_rpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.files import wait_until

CHUNK = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_requests(
    run_id: str, path: str, data: bytes, *, digest: str | None = None, request_id: str = ""
) -> Iterator[pb.UploadArtifactRequest]:
    yield pb.UploadArtifactRequest(
        header=pb.UploadArtifactHeader(
            run_id=run_id, artifact_path=path, size_bytes=len(data), request_id=request_id
        )
    )
    for start in range(0, len(data), CHUNK):
        yield pb.UploadArtifactRequest(chunk=data[start : start + CHUNK])
    yield pb.UploadArtifactRequest(
        trailer=pb.UploadArtifactTrailer(sha256=sha(data) if digest is None else digest)
    )


def stored_bytes(tracking_uri: str, run_id: str, path: str, dst: Path) -> bytes:
    """The artifact as a plain MLflow client downloads it."""
    plain = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return Path(plain.download_artifacts(run_id, path, str(dst))).read_bytes()


def test_a_bad_upload_over_an_existing_artifact_keeps_the_stored_bytes(
    tracking_stub, mlflow_server, run_id, tmp_path
):
    good = os.urandom(3 * CHUNK)
    reply = tracking_stub.UploadArtifact(upload_requests(run_id, "ckpt/model.pt", good), timeout=60)
    assert reply.sha256 == sha(good)

    # Most of these bytes reach MLflow before the wrong digest is seen at the end.
    bad = os.urandom(8 * CHUNK)
    with pytest.raises(grpc.RpcError) as err:
        tracking_stub.UploadArtifact(
            upload_requests(run_id, "ckpt/model.pt", bad, digest=sha(b"other")), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert stored_bytes(mlflow_server.url, run_id, "ckpt/model.pt", tmp_path) == good


def test_a_streamed_upload_cut_by_an_mlflow_restart_is_unavailable_and_stores_nothing(
    own_mlflow, tmp_path
):
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    run_id = plain.create_run(plain.create_experiment("restart")).info.run_id
    running = RunningSidecar(
        sidecar_config(tmp_path / "sidecar", own_mlflow.url, retry={"max_time_s": 60})
    )
    data = os.urandom(16 * CHUNK)
    half_sent = threading.Event()
    carry_on = threading.Event()

    def requests() -> Iterator[pb.UploadArtifactRequest]:
        for index, message in enumerate(upload_requests(run_id, "ckpt/restart.pt", data)):
            if index == 8:
                half_sent.set()
                carry_on.wait(60)
            yield message

    outcome: dict[str, object] = {}

    def upload() -> None:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            try:
                outcome["reply"] = stub.UploadArtifact(requests(), timeout=120)
            except grpc.RpcError as exc:
                outcome["code"] = exc.code()

    thread = threading.Thread(target=upload)
    try:
        thread.start()
        assert half_sent.wait(60)
        own_mlflow.stop()  # cuts the PUT in flight
        own_mlflow.start()
        carry_on.set()
        thread.join(120)
    finally:
        carry_on.set()
        running.stop()
    # The sidecar kept no copy: the caller is told to send the file again.
    assert outcome == {"code": grpc.StatusCode.UNAVAILABLE}
    # No file anywhere; the directory MLflow made for the PUT may stay, since MLflow was
    # down when the sidecar tried to remove it.
    assert [f.path for f in plain.list_artifacts(run_id) if not f.is_dir] == []
    assert plain.list_artifacts(run_id, "ckpt") == []


def test_the_typed_client_sends_the_file_again_after_an_mlflow_restart(own_mlflow, tmp_path):
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    run_id = plain.create_run(plain.create_experiment("restart-typed")).info.run_id
    running = RunningSidecar(sidecar_config(tmp_path / "sidecar", own_mlflow.url))
    data = os.urandom(16 * CHUNK)
    source = tmp_path / "restart.pt"
    source.write_bytes(data)
    restarts = []

    def progress(done: int, total: int) -> None:
        if done >= total // 2 and not restarts:
            restarts.append(done)
            own_mlflow.stop()  # mid-upload, once
            own_mlflow.start()

    container = ClientContainer()
    container.config.from_dict({"target": running.target})
    try:
        info = container.experiment_tracking().upload_artifact(
            run_id, source, "ckpt/restart.pt", progress=progress
        )
    finally:
        container.shutdown_resources()
        running.stop()
    assert restarts
    assert (info.size_bytes, info.sha256) == (len(data), sha(data))
    assert stored_bytes(own_mlflow.url, run_id, "ckpt/restart.pt", tmp_path / "dl") == data


def test_typed_client_round_trip_of_a_multi_chunk_file(client_container, run_id, tmp_path):
    data = os.urandom(5 * CHUNK + 17)
    source = tmp_path / "weights.bin"
    source.write_bytes(data)
    tracking = client_container.experiment_tracking()
    info = tracking.upload_artifact(run_id, source, "w/weights.bin")
    assert (info.size_bytes, info.sha256) == (len(data), sha(data))
    path = tracking.download_artifact(run_id, "w/weights.bin", tmp_path / "back")
    assert path.read_bytes() == data


def test_a_download_client_gone_midway_leaves_the_sidecar_serving(
    tracking_stub, run_id, channel: grpc.Channel, client_container: ClientContainer, tmp_path
):
    data = os.urandom(12 * CHUNK)
    tracking_stub.UploadArtifact(upload_requests(run_id, "big.bin", data), timeout=60)
    call = tracking_stub.DownloadArtifact(
        pb.DownloadArtifactRequest(run_id=run_id, artifact_path="big.bin"), timeout=60
    )
    first = next(call)
    assert first.header.size_bytes == len(data)
    next(call)
    call.cancel()
    # The sidecar let go of the MLflow response: the next download is whole.
    tracking = client_container.experiment_tracking()
    path = tracking.download_artifact(run_id, "big.bin", tmp_path)
    assert path.read_bytes() == data


def test_the_embedded_store_takes_artifacts_through_a_staged_file(tmp_path):
    """The default embedded store is not MLflow's HTTP proxy: uploads are stored once
    verified, downloads are fetched whole first; both ends see the same contract."""
    running = RunningSidecar(sidecar_config(tmp_path / "sidecar", ""))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            experiment_id = stub.CreateExperiment(
                pb.CreateExperimentRequest(name="embedded-artifacts")
            ).experiment.experiment_id
            run_id = stub.StartRun(pb.StartRunRequest(experiment_id=experiment_id)).run.info.run_id
            data = os.urandom(3 * CHUNK + 1)
            reply = stub.UploadArtifact(upload_requests(run_id, "a/b.bin", data), timeout=60)
            assert reply.sha256 == sha(data)
            with pytest.raises(grpc.RpcError) as err:
                stub.UploadArtifact(
                    upload_requests(run_id, "c/d.bin", data, digest=sha(b"x")), timeout=60
                )
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
            listed = stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id), timeout=30)
            assert [f.path for f in listed.files] == ["a"]
            messages = list(
                stub.DownloadArtifact(
                    pb.DownloadArtifactRequest(run_id=run_id, artifact_path="a/b.bin"), timeout=60
                )
            )
            assert messages[0].header.size_bytes == len(data)
            assert b"".join(m.chunk for m in messages[1:-1]) == data
            assert messages[-1].trailer.sha256 == sha(data)
    finally:
        running.stop()


def _stored_beside(tracking_stub, mlflow_server, run_id, name: str, sibling: str) -> bytes:
    """Put `name` and `sibling` straight into the run's artifacts on the server's disk, as
    a store written without the sidecar may hold them; the bytes of `name`."""
    run = tracking_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run
    stored = Path(mlflow_server.artifacts) / run.info.experiment_id / run_id / "artifacts"
    (stored / name).parent.mkdir(parents=True, exist_ok=True)
    wanted = os.urandom(3 * CHUNK + 5)
    (stored / name).write_bytes(wanted)
    (stored / sibling).write_bytes(os.urandom(1000))
    return wanted


def test_a_file_whose_name_holds_a_question_mark_downloads_as_itself(
    tracking_stub, client_container, mlflow_server, run_id, tmp_path
):
    # Such a name cannot be uploaded through the sidecar, but MLflow may hold it from
    # elsewhere: the download must not reach the file the name's URL would name.
    wanted = _stored_beside(tracking_stub, mlflow_server, run_id, "m.pt?v=2", "m.pt")
    tracking = client_container.experiment_tracking()
    downloaded = tracking.download_artifact(run_id, "m.pt?v=2", tmp_path)
    assert downloaded == tmp_path / "m.pt?v=2"
    assert downloaded.read_bytes() == wanted


@pytest.mark.parametrize(("name", "sibling"), [("p%41q.bin", "pAq.bin"), ("a#1.bin", "a")])
def test_a_file_whose_name_mlflow_decodes_is_refused_not_swapped(
    tracking_stub, client_container, mlflow_server, run_id, tmp_path, name, sibling
):
    # MLflow decodes '%' escapes in the paths it lists and serves, and refuses '#': such a
    # file cannot be read through its proxy (MLflow's own client cannot either), and the
    # answer says so (NOT_FOUND, or MLflow's INVALID_ARGUMENT) instead of sending `sibling`.
    _stored_beside(tracking_stub, mlflow_server, run_id, name, sibling)
    tracking = client_container.experiment_tracking()
    with pytest.raises((NotFoundError, InvalidArgumentError)):
        tracking.download_artifact(run_id, name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_upload_repeated_with_its_request_id_has_one_effect(
    tracking_stub, mlflow_server, run_id, unique, tmp_path
):
    first, newer = os.urandom(CHUNK + 7), os.urandom(CHUNK + 7)
    request_id = f"upload-{unique}"
    answer = tracking_stub.UploadArtifact(
        upload_requests(run_id, "ckpt/last.pt", first, request_id=request_id), timeout=60
    )
    tracking_stub.UploadArtifact(upload_requests(run_id, "ckpt/last.pt", newer), timeout=60)
    # The first call's retry, arriving late: it answers as the first did and stores nothing.
    again = tracking_stub.UploadArtifact(
        upload_requests(run_id, "ckpt/last.pt", first, request_id=request_id), timeout=60
    )
    assert again == answer
    assert stored_bytes(mlflow_server.url, run_id, "ckpt/last.pt", tmp_path / "a") == newer

    for path, data in (("ckpt/last.pt", newer), ("ckpt/other.pt", first), ("ckpt/last.pt", b"x")):
        with pytest.raises(grpc.RpcError) as err:
            tracking_stub.UploadArtifact(
                upload_requests(run_id, path, data, request_id=request_id), timeout=60
            )
        refusal = error_from_rpc(err.value)
        assert (refusal.reason, refusal.field) == ("REQUEST_ID_REUSED", "header.request_id")
    assert stored_bytes(mlflow_server.url, run_id, "ckpt/last.pt", tmp_path / "b") == newer
    listed = tracking_stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id, path="ckpt"))
    assert [f.path for f in listed.files] == ["ckpt/last.pt"]


def test_uploads_of_one_request_id_go_one_at_a_time(
    sidecar, tracking_stub, mlflow_server, run_id, unique, tmp_path
):
    first, other = b"A" * 4096, b"B" * 4096
    request_id = f"race-{unique}"
    header_sent, go_on = threading.Event(), threading.Event()

    def slow_first() -> Iterator[pb.UploadArtifactRequest]:
        messages = upload_requests(run_id, "ckpt/race.pt", first, request_id=request_id)
        yield next(messages)
        header_sent.set()
        go_on.wait(30)
        yield from messages

    answers: dict[str, object] = {}

    def upload(name: str, messages: Iterator[pb.UploadArtifactRequest]) -> None:
        try:
            answers[name] = tracking_stub.UploadArtifact(messages, timeout=60).sha256
        except grpc.RpcError as exc:
            answers[name] = error_from_rpc(exc).reason

    held = sidecar.container.request_ledger()._calls
    slow = threading.Thread(target=upload, args=("first", slow_first()))
    slow.start()
    try:
        assert header_sent.wait(30)
        # Sent is not yet read: the first is first once the sidecar holds its request id.
        assert wait_until(lambda: len(held) >= 1), "the first upload never held its request id"
        racing = threading.Thread(
            target=upload,
            args=("other", upload_requests(run_id, "ckpt/race.pt", other, request_id=request_id)),
        )
        racing.start()
        racing.join(1.0)
        assert racing.is_alive(), "an upload of the same request id did not wait for the first"
    finally:
        go_on.set()  # a failure here must not leave the first upload staged for the next tests
    slow.join(60)
    racing.join(60)
    assert answers == {"first": sha(first), "other": "REQUEST_ID_REUSED"}
    assert stored_bytes(mlflow_server.url, run_id, "ckpt/race.pt", tmp_path) == first


def test_a_model_file_whose_name_holds_a_question_mark_downloads_as_itself(
    tracking_stub, client_container, mlflow_server, run_id, tmp_path, unique
):
    # As DownloadArtifact: the model's file is read as itself, not as the file its URL
    # would name without the query MLflow's client makes of the '?'.
    wanted = _stored_beside(tracking_stub, mlflow_server, run_id, "model/q?x", "model/q")
    registry = client_container.model_registry()
    name = f"query-{unique}"
    registry.create_registered_model(name)
    version = registry.create_model_version(name, source=f"runs:/{run_id}/model").version
    root = registry.download_model(name, tmp_path / "down", version=version)
    assert (root / "q?x").read_bytes() == wanted
    assert (root / "q").read_bytes() != wanted
