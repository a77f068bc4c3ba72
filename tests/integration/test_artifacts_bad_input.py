"""Bad uploads against a real sidecar and MLflow: each gets its status code and leaves nothing
behind - no artifact, no model version, no registered model, no staged file."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import (
    ErrorReason,
    ResourceExhaustedError,
    SidecarError,
    error_from_rpc,
)
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2_grpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.delay_proxy import DelayProxy
from tests.support.files import MIB, random_file, wait_until
from tests.unit.test_artifact_paths import MLFLOW_IN_PROGRESS, UNSAFE, URL_SYNTAX

CHUNK = 64 * 1024
LIMIT = MIB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_requests(
    run_id: str,
    data: bytes,
    *,
    path: str = "bad/file.bin",
    size: int | None = None,
    digest: str | None = None,
) -> list[pb.UploadArtifactRequest]:
    header = pb.UploadArtifactHeader(
        run_id=run_id,
        artifact_path=path,
        size_bytes=len(data) if size is None else size,
        sha256=sha(data) if digest is None else digest,
    )
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return [
        pb.UploadArtifactRequest(header=header),
        *(pb.UploadArtifactRequest(chunk=c) for c in chunks),
    ]


def model_requests(
    name: str, run_id: str, files: dict[str, bytes], *, total: int | None = None
) -> list[reg_pb.UploadModelRequest]:
    header = reg_pb.UploadModelHeader(
        name=name,
        run_id=run_id,
        aliases=["champion"],
        total_size_bytes=sum(map(len, files.values())) if total is None else total,
    )
    requests = [reg_pb.UploadModelRequest(header=header)]
    for path, data in files.items():
        announced = reg_pb.UploadModelFile(path=path, size_bytes=len(data), sha256=sha(data))
        requests.append(reg_pb.UploadModelRequest(file=announced))
        requests += [
            reg_pb.UploadModelRequest(chunk=data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)
        ]
    return requests


@pytest.fixture()
def run_id(tracking_stub, unique) -> str:
    experiment = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"bad-input-{unique}")
    ).experiment.experiment_id
    return tracking_stub.StartRun(pb.StartRunRequest(experiment_id=experiment)).run.info.run_id


def assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id, model_name=None):
    """No artifact in the run, no model of that name, nothing staged."""
    listed = tracking_stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id))
    assert list(listed.files) == []
    if model_name is not None:
        versions = registry_stub.SearchModelVersions(
            reg_pb.SearchModelVersionsRequest(filter=f"name = '{model_name}'")
        )
        assert list(versions.model_versions) == []
        with pytest.raises(grpc.RpcError) as err:
            registry_stub.GetRegisteredModel(reg_pb.GetRegisteredModelRequest(name=model_name))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert sidecar.container.staging().in_flight() == []


def root_entries(tracking_stub, run_id: str) -> list[str]:
    """The paths listed at the root of the run's artifacts."""
    listed = tracking_stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id), timeout=10)
    return [f.path for f in listed.files]


# The header and six chunks: past the four chunks the sidecar queues before an upload's PUT
# to MLflow begins, so that a stream held or cut after them cuts a PUT that has begun.
PUT_BEGUN = 7


def call_fails(method, requests, code: grpc.StatusCode) -> SidecarError:
    """The domain error (from the status details) of a streaming call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        method(iter(requests), timeout=60)
    assert err.value.code() == code, err.value.details()
    return error_from_rpc(err.value)


# -- path safety --------------------------------------------------------------------------


# A path MLflow's artifact proxy would read as URL syntax stores nothing under another name;
# one MLflow's server reserves leaves no directory that it made before refusing the name.
REFUSED = {**UNSAFE, **URL_SYNTAX, **MLFLOW_IN_PROGRESS}


@pytest.mark.parametrize("path", REFUSED.values(), ids=REFUSED.keys())
def test_unsafe_artifact_path_is_invalid_and_writes_nothing(
    sidecar, tracking_stub, registry_stub, run_id, path
):
    error = call_fails(
        tracking_stub.UploadArtifact,
        artifact_requests(run_id, b"payload", path=path),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.field == "header.artifact_path"
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id)


@pytest.mark.parametrize(
    ("path", "taken"),
    [("kept", "directory"), ("kept/file.bin/under.bin", "file")],
    ids=["over a directory", "under a file"],
)
def test_a_file_the_runs_artifacts_leave_no_room_for_is_refused_and_writes_nothing(
    sidecar, tracking_stub, run_id, path, taken
):
    # MLflow's server fails such a PUT with a bare 500 once it has every byte: an
    # UNAVAILABLE that sending it again never gets past.
    kept = os.urandom(3 * CHUNK)
    tracking_stub.UploadArtifact(iter(artifact_requests(run_id, kept, path="kept/file.bin")))
    error = call_fails(
        tracking_stub.UploadArtifact,
        artifact_requests(run_id, os.urandom(3 * CHUNK), path=path),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert f"has a {taken} at" in error.message
    listed = tracking_stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id, path="kept"))
    assert [(f.path, f.size_bytes) for f in listed.files] == [("kept/file.bin", len(kept))]


def test_a_model_into_a_run_with_a_file_named_models_is_refused_and_registers_nothing(
    sidecar, tracking_stub, registry_stub, run_id, unique
):
    tracking_stub.UploadArtifact(iter(artifact_requests(run_id, b"not a directory", path="models")))
    name = f"no-room-{unique}"
    error = call_fails(
        registry_stub.UploadModel,
        model_requests(name, run_id, {"MLmodel": b"flavors: {}\n"}),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "has a file at 'models'" in error.message
    listed = tracking_stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id))
    assert [(f.path, f.is_dir) for f in listed.files] == [("models", False)]
    with pytest.raises(grpc.RpcError) as err:
        registry_stub.GetRegisteredModel(reg_pb.GetRegisteredModelRequest(name=name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


HEADER_FAULTS = {
    "blank name": ({"name": ""}, "header.name"),
    "bad run id": ({"run_id": "bad id!"}, "header.run_id"),
    "run and experiment": ({"experiment_id": "0"}, "header.experiment_id"),
    "reserved alias": ({"aliases": ["latest"]}, "header.aliases[0]"),
    "bad tag": ({"tags": {"": "v"}}, "header.tags"),
}


@pytest.mark.parametrize(("fault", "field"), HEADER_FAULTS.values(), ids=HEADER_FAULTS.keys())
def test_a_bad_model_header_is_refused_naming_the_field_as_the_request_spells_it(
    sidecar, tracking_stub, registry_stub, run_id, unique, fault, field
):
    name = f"bad-header-{unique}"
    requests = model_requests(name, run_id, {"MLmodel": b"ok"})
    header = requests[0].header
    for key, value in fault.items():
        if isinstance(value, str):
            setattr(header, key, value)
        elif isinstance(value, dict):
            getattr(header, key).update(value)
        else:
            getattr(header, key)[:] = value
    error = call_fails(registry_stub.UploadModel, requests, grpc.StatusCode.INVALID_ARGUMENT)
    assert error.field == field or error.field.startswith((f"{field}[", f"{field}."))
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id, name or None)


@pytest.mark.parametrize("path", REFUSED.values(), ids=REFUSED.keys())
def test_unsafe_model_file_path_is_invalid_and_registers_nothing(
    sidecar, tracking_stub, registry_stub, run_id, unique, path
):
    name = f"unsafe-{unique}"
    error = call_fails(
        registry_stub.UploadModel,
        model_requests(name, run_id, {"MLmodel": b"ok", path: b"evil"}),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.field == "file.path"
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id, name)


# -- messages out of place ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        (pb.UploadArtifactRequest(), "payload", "carries nothing; it must carry a chunk"),
        (
            pb.UploadArtifactRequest(header=pb.UploadArtifactHeader(run_id="r")),
            "header",
            "only the first message may carry a header",
        ),
    ],
    ids=["empty", "second header"],
)
def test_an_artifact_message_out_of_place_is_named_and_writes_nothing(
    sidecar, tracking_stub, registry_stub, run_id, extra, field, words
):
    requests = artifact_requests(run_id, b"payload")
    error = call_fails(
        tracking_stub.UploadArtifact,
        [requests[0], extra, *requests[1:]],
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (error.field, words in error.message) == (field, True), error.message
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id)


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        (reg_pb.UploadModelRequest(), "payload", "carries nothing; it must carry a file"),
        (
            reg_pb.UploadModelRequest(header=reg_pb.UploadModelHeader(name="m")),
            "header",
            "only the first message may carry a header",
        ),
    ],
    ids=["empty", "second header"],
)
def test_a_model_message_out_of_place_is_named_and_registers_nothing(
    sidecar, tracking_stub, registry_stub, run_id, unique, extra, field, words
):
    name = f"out-of-place-{unique}"
    requests = model_requests(name, run_id, {"MLmodel": b"flavors: {}\n"})
    error = call_fails(
        registry_stub.UploadModel,
        [requests[0], extra, *requests[1:]],
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (error.field, words in error.message) == (field, True), error.message
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id, name)


# -- truncated and corrupted streams ------------------------------------------------------


def test_artifact_stream_with_fewer_bytes_than_announced_is_data_loss(
    sidecar, tracking_stub, registry_stub, run_id
):
    data = os.urandom(5 * CHUNK)
    truncated = artifact_requests(run_id, data)[:-2]
    error = call_fails(tracking_stub.UploadArtifact, truncated, grpc.StatusCode.DATA_LOSS)
    assert error.reason == ErrorReason.DIGEST_MISMATCH
    assert f"received {3 * CHUNK} of the {5 * CHUNK} bytes" in error.message
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id)


@pytest.mark.parametrize("bad", ["", "not a run!", "-x", "r" * 65])
def test_a_malformed_run_id_is_invalid_on_the_headers_field(sidecar, tracking_stub, bad):
    error = call_fails(
        tracking_stub.UploadArtifact,
        artifact_requests(bad, b"payload"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.field == "header.run_id"
    assert sidecar.container.staging().in_flight() == []


def test_artifact_with_a_wrong_sha256_is_data_loss(sidecar, tracking_stub, registry_stub, run_id):
    data = os.urandom(3 * CHUNK)
    wrong = artifact_requests(run_id, data, digest=sha(data[::-1]))
    error = call_fails(tracking_stub.UploadArtifact, wrong, grpc.StatusCode.DATA_LOSS)
    assert error.reason == ErrorReason.DIGEST_MISMATCH
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id)


def test_model_stream_cut_short_is_data_loss(sidecar, tracking_stub, registry_stub, run_id, unique):
    name = f"short-{unique}"
    files = {"MLmodel": b"flavors: {}\n", "weights.bin": os.urandom(4 * CHUNK)}
    truncated = model_requests(name, run_id, files)[:-1]
    call_fails(registry_stub.UploadModel, truncated, grpc.StatusCode.DATA_LOSS)
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id, name)


def test_model_file_with_a_wrong_sha256_is_data_loss(
    sidecar, tracking_stub, registry_stub, run_id, unique
):
    name = f"corrupt-{unique}"
    requests = model_requests(name, run_id, {"a.bin": b"alpha", "b.bin": os.urandom(CHUNK)})
    requests[4].file.sha256 = sha(b"something else")
    error = call_fails(registry_stub.UploadModel, requests, grpc.StatusCode.DATA_LOSS)
    assert error.reason == ErrorReason.DIGEST_MISMATCH
    assert "b.bin" in error.message
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id, name)


# -- cancellation -------------------------------------------------------------------------


def stalled(requests: list, release: threading.Event) -> Iterator:
    """Send some requests, then hold the stream open until `release` is set."""
    yield from requests
    release.wait(60)


def staged_bytes(sidecar) -> int:
    return sum(
        f.stat().st_size
        for d in sidecar.container.staging().in_flight()
        for f in d.rglob("*")
        if f.is_file()
    )


def test_artifact_upload_cancelled_midway_leaves_nothing(
    sidecar, tracking_stub, registry_stub, run_id
):
    data = os.urandom(8 * CHUNK)
    release = threading.Event()
    future = tracking_stub.UploadArtifact.future(
        stalled(artifact_requests(run_id, data)[:PUT_BEGUN], release), timeout=60
    )
    try:
        # The sidecar streams the upload to MLflow without staging it: past the chunks it
        # queues first, the PUT has begun (MLflow shows the file's directory) when the
        # client goes away.
        assert wait_until(lambda: root_entries(tracking_stub, run_id) == ["bad"])
        future.cancel()
    finally:
        release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert wait_until(lambda: sidecar.container.staging().in_flight() == [])
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id)


def test_a_failed_upload_spares_the_directory_another_upload_is_writing_into(
    sidecar, tracking_stub, run_id
):
    # MLflow's server keeps a file in progress out of its listings: the directory of an
    # upload under way looks empty to the failed upload's cleanup, yet is not.
    data = os.urandom(8 * CHUNK)
    going_on = artifact_requests(run_id, data, path="shared/kept.bin")
    release = threading.Event()

    def held_midway() -> Iterator[pb.UploadArtifactRequest]:
        yield from going_on[:PUT_BEGUN]
        release.wait(60)
        yield from going_on[PUT_BEGUN:]

    future = tracking_stub.UploadArtifact.future(held_midway(), timeout=60)
    try:
        assert wait_until(lambda: root_entries(tracking_stub, run_id) == ["shared"])
        # Short of its announced size: cut midway, after its PUT had begun.
        short = artifact_requests(run_id, data, path="shared/cut.bin")[: PUT_BEGUN + 1]
        call_fails(tracking_stub.UploadArtifact, short, grpc.StatusCode.DATA_LOSS)
    finally:
        release.set()
    assert future.result().sha256 == sha(data)
    listed = tracking_stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id, path="shared"))
    assert [(f.path, f.size_bytes) for f in listed.files] == [("shared/kept.bin", len(data))]


def test_model_upload_cancelled_midway_leaves_nothing(
    sidecar, tracking_stub, registry_stub, run_id, unique
):
    name = f"cancelled-{unique}"
    files = {"a.bin": os.urandom(2 * CHUNK), "b.bin": os.urandom(4 * CHUNK)}
    release = threading.Event()
    requests = model_requests(name, run_id, files)[:6]  # header, a.bin, b.bin, 1 chunk of it
    future = registry_stub.UploadModel.future(stalled(requests, release), timeout=60)
    try:
        assert wait_until(lambda: staged_bytes(sidecar) >= 3 * CHUNK)
        future.cancel()
    finally:
        release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert wait_until(lambda: sidecar.container.staging().in_flight() == [])
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id, name)


def test_download_cancelled_midway_cleans_up(
    sidecar, client_container, tracking_stub, run_id, tmp_path
):
    tracking = client_container.experiment_tracking()
    tracking.upload_artifact(run_id, random_file(tmp_path / "big.bin", 16 * MIB), "big.bin")
    call = tracking_stub.DownloadArtifact(
        pb.DownloadArtifactRequest(run_id=run_id, artifact_path="big.bin"), timeout=60
    )
    assert next(call).WhichOneof("payload") == "header"
    assert next(call).WhichOneof("payload") == "chunk"
    call.cancel()
    assert wait_until(lambda: sidecar.container.staging().in_flight() == [])


class AbortError(Exception):
    """Raised by a progress callback to stop a transfer."""


def test_progress_callback_can_abort_an_upload(
    sidecar, client_container, tracking_stub, registry_stub, run_id, tmp_path
):
    tracking = client_container.experiment_tracking()
    source = random_file(tmp_path / "big.bin", 8 * MIB)

    def stop_halfway(done: int, total: int) -> None:
        if done > total // 2:
            raise AbortError()

    with pytest.raises(AbortError):
        tracking.upload_artifact(run_id, source, progress=stop_halfway)
    assert wait_until(lambda: sidecar.container.staging().in_flight() == [])
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id)


# -- size limit ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(mlflow_server, tmp_path_factory) -> Iterator[RunningSidecar]:
    """A sidecar that accepts uploads of at most 1 MiB."""
    config = sidecar_config(
        tmp_path_factory.mktemp("limited"),
        mlflow_server.url,
        artifacts={"max_upload_bytes": LIMIT, "chunk_bytes": CHUNK},
    )
    running = RunningSidecar(config)
    yield running
    running.stop()


@pytest.fixture()
def limited_stubs(limited):
    with grpc.insecure_channel(limited.target) as channel:
        yield (
            tracking_pb2_grpc.ExperimentTrackingServiceStub(channel),
            registry_pb2_grpc.ModelRegistryServiceStub(channel),
        )


def test_artifact_announced_over_the_limit_is_resource_exhausted(limited, limited_stubs, run_id):
    tracking_stub, registry_stub = limited_stubs
    requests = artifact_requests(run_id, b"", size=LIMIT + 1, digest="0" * 64)
    error = call_fails(tracking_stub.UploadArtifact, requests, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert (error.reason, error.field) == (ErrorReason.UPLOAD_TOO_LARGE, "header.size_bytes")
    assert_nothing_left(limited, tracking_stub, registry_stub, run_id)


def test_artifact_bytes_over_the_limit_are_resource_exhausted(limited, limited_stubs, run_id):
    tracking_stub, registry_stub = limited_stubs
    data = os.urandom(LIMIT + CHUNK)
    # Announced within the limit, but the stream keeps going past it.
    requests = artifact_requests(run_id, data, size=LIMIT, digest=sha(data[:LIMIT]))
    error = call_fails(tracking_stub.UploadArtifact, requests, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.reason == ErrorReason.UPLOAD_TOO_LARGE
    assert_nothing_left(limited, tracking_stub, registry_stub, run_id)


def test_model_over_the_limit_is_resource_exhausted(limited, limited_stubs, run_id, unique):
    tracking_stub, registry_stub = limited_stubs
    name = f"huge-{unique}"
    files = {"a.bin": os.urandom(LIMIT // 2), "b.bin": os.urandom(LIMIT // 2 + 1)}
    call_fails(
        registry_stub.UploadModel,
        model_requests(name, run_id, files),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    # Without a declared total the announced sizes still add up past the limit.
    call_fails(
        registry_stub.UploadModel,
        model_requests(name, run_id, files, total=0),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert_nothing_left(limited, tracking_stub, registry_stub, run_id, name)


def test_typed_client_reports_the_limit(limited, limited_stubs, run_id, tmp_path):
    container = ClientContainer()
    container.config.from_dict({"target": limited.target})
    try:
        tracking = container.experiment_tracking()
        with pytest.raises(ResourceExhaustedError):
            tracking.upload_artifact(run_id, random_file(tmp_path / "big.bin", LIMIT + 1))
        # Exactly at the limit is fine.
        info = tracking.upload_artifact(run_id, random_file(tmp_path / "ok.bin", LIMIT))
        assert info.size_bytes == LIMIT
    finally:
        container.shutdown_resources()


# -- cleanup after a call whose deadline has passed ---------------------------------------


def test_an_artifact_upload_cut_by_its_deadline_leaves_no_empty_directory(
    sidecar, tracking_stub, registry_stub, run_id
):
    # MLflow is up: what a deadline leaves behind is removed as for a cancel, though the
    # call's own deadline is gone by the time the cleanup runs.
    data = os.urandom(8 * CHUNK)
    release = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as ended:
            tracking_stub.UploadArtifact(
                stalled(artifact_requests(run_id, data, path="ckpt/x.bin")[:PUT_BEGUN], release),
                timeout=2,
            )
    finally:
        release.set()
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: root_entries(tracking_stub, run_id) == []), (
        "the abandoned upload's directory is still listed"
    )
    assert_nothing_left(sidecar, tracking_stub, registry_stub, run_id)


def test_a_model_upload_cut_by_its_deadline_leaves_no_files(mlflow_server, tmp_path, unique):
    # Registering the version is refused until the call's deadline has passed: the upload
    # is undone, its files included, with the call's deadline already gone.
    def versions_refused(method: str, path: str) -> bool:
        return method == "POST" and path.split("?", maxsplit=1)[0].endswith(
            "/model-versions/create"
        )

    with DelayProxy(
        mlflow_server.url, delay_s=0, delayed=lambda _m, _p: False, refused=versions_refused
    ) as proxy:
        # Retries bounded by the deadline alone, not by a count of tries.
        retry = {"max_tries": 100, "max_time_s": 60.0, "factor_s": 0.05, "max_backoff_s": 0.2}
        running = RunningSidecar(sidecar_config(tmp_path / "sidecar", proxy.url, retry=retry))
        try:
            with grpc.insecure_channel(running.target) as channel:
                tracking = tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)
                registry = registry_pb2_grpc.ModelRegistryServiceStub(channel)
                experiment = tracking.CreateExperiment(
                    pb.CreateExperimentRequest(name=f"cut-model-{unique}")
                ).experiment.experiment_id
                run_id = tracking.StartRun(
                    pb.StartRunRequest(experiment_id=experiment)
                ).run.info.run_id
                name = f"cut-{unique}"
                files = {"MLmodel": b"flavors: {}\n", "w.bin": os.urandom(2 * CHUNK)}
                with pytest.raises(grpc.RpcError) as ended:
                    registry.UploadModel(iter(model_requests(name, run_id, files)), timeout=3)
                assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

                def listed(path: str) -> list[str]:
                    request = pb.ListArtifactsRequest(run_id=run_id, path=path)
                    return [f.path for f in tracking.ListArtifacts(request).files]

                # The run's `models` directory may stay (another upload to the run may be
                # writing into it); nothing of this upload does.
                assert wait_until(lambda: listed("models") == []), listed("models")
                assert listed("") in ([], ["models"])
                versions = registry.SearchModelVersions(
                    reg_pb.SearchModelVersionsRequest(filter=f"name = '{name}'")
                )
                assert list(versions.model_versions) == []
        finally:
            running.stop()
