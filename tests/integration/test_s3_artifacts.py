"""Artifacts and models on S3 (moto's S3 server), configured the way MLflow users do.

Three ways the bytes reach S3, through two `mlflow server`s on one bucket:

- `proxied`: `--artifacts-destination s3://…`; the sidecar streams to MLflow's artifact
  proxy, which writes to S3 (boto3's own multipart upload above 8 MiB), and reads a
  download from S3 itself through the URL the server presigns, as MLflow's client does;
- `proxied-multipart`: the same server with `MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD` set in
  the sidecar's environment: large files go to S3 in parts of
  `MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE`, through URLs the server presigns;
- `direct`: `--default-artifact-root s3://… --no-serve-artifacts`; the sidecar writes to
  S3 itself with `AWS_*` credentials and `MLFLOW_S3_ENDPOINT_URL` from its environment.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import mlflow
import pytest
import tomllib
from mlflow.store.artifact import s3_artifact_repo
from mlflow.tracking import MlflowClient

from mlflow_sidecar.client import ClientContainer, ExperimentTracking
from mlflow_sidecar.core.errors import (
    ErrorReason,
    FailedPreconditionError,
    PermissionDeniedError,
    UnavailableError,
)
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import (
    MlflowServerFactory,
    RunningSidecar,
    sidecar_config,
)
from tests.integration.test_artifact_streaming import sha, upload_requests
from tests.support.files import MIB, random_file, sha256_of, tree_digests
from tests.support.processes import MlflowServer, free_port
from tests.support.s3 import MotoS3, multipart_parts

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "sidecar-artifacts"
# Above boto3's multipart threshold (8 MiB) and two of the proxy's parts below.
LARGE_BYTES = 12 * MIB + 5
PROXY_PART_BYTES = 5 * MIB  # S3's smallest part

PROXY_MULTIPART_ENV = {
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
    "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(PROXY_PART_BYTES),
    "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": str(PROXY_PART_BYTES),
}


@dataclass
class S3Setup:
    """An mlflow server whose artifacts live in the bucket under `prefix`, and a sidecar."""

    server: MlflowServer
    sidecar: RunningSidecar
    prefix: str


@pytest.fixture(scope="module")
def s3_setups(
    mlflow_server_factory: MlflowServerFactory,
    tmp_path_factory: pytest.TempPathFactory,
    moto_s3: MotoS3,
) -> Iterator[dict[str, S3Setup]]:
    """The proxying server and the one clients write past, each with its sidecar."""
    moto_s3.create_bucket(BUCKET)
    workdir = tmp_path_factory.mktemp("s3")
    servers = {
        prefix: mlflow_server_factory(
            workdir / prefix / "mlflow",
            artifacts=f"s3://{BUCKET}/{prefix}",
            serve_artifacts=prefix == "proxied",
            env=moto_s3.env,
        )
        for prefix in ("proxied", "direct")
    }
    sidecars: list[RunningSidecar] = []
    try:
        # Side by side: each start is mostly waiting for MLflow's imports.
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(MlflowServer.start, servers.values()))
        setups = {}
        for prefix, server in servers.items():
            sidecar = RunningSidecar(sidecar_config(workdir / prefix / "sidecar", server.url))
            sidecars.append(sidecar)
            setups[prefix] = S3Setup(server, sidecar, prefix)
        yield setups
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(MlflowServer.stop, servers.values()))


@pytest.fixture(scope="module")
def direct_s3(s3_setups) -> S3Setup:
    return s3_setups["direct"]


@pytest.fixture(params=["proxied", "proxied-multipart", "direct"])
def mode(request, moto_s3, monkeypatch) -> str:
    """MLflow's S3 settings go in the environment of whoever moves the bytes: the
    in-process sidecar and the plain MLflow client of the interop tests alike. Behind the
    proxy they need none: the server holds the credentials (and presigns the parts)."""
    for name, value in moto_s3.env.items():
        if request.param == "direct":
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    for name, value in PROXY_MULTIPART_ENV.items():
        if request.param == "proxied-multipart":
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    return str(request.param)


@pytest.fixture()
def setup(mode, s3_setups) -> S3Setup:
    return s3_setups["direct" if mode == "direct" else "proxied"]


@pytest.fixture()
def container(setup) -> Iterator[ClientContainer]:
    made = ClientContainer()
    made.config.from_dict({"target": setup.sidecar.target, "timeout_s": 60.0})
    yield made
    made.shutdown_resources()


@pytest.fixture()
def tracking(container):
    return container.experiment_tracking()


@pytest.fixture()
def tracking_for_direct(direct_s3) -> Iterator[ExperimentTracking]:
    """A typed client of the sidecar that writes to S3 itself."""
    made = ClientContainer()
    made.config.from_dict({"target": direct_s3.sidecar.target, "timeout_s": 60.0})
    yield made.experiment_tracking()
    made.shutdown_resources()


@pytest.fixture()
def run(tracking, unique, mode) -> tuple[str, str]:
    """(experiment id, run id) of a fresh run."""
    experiment = tracking.create_experiment(f"s3-{mode}-{unique}")
    return experiment.experiment_id, tracking.start_run(experiment.experiment_id).run_id


def _run_key(setup: S3Setup, run: tuple[str, str], path: str = "") -> str:
    experiment_id, run_id = run
    return f"{setup.prefix}/{experiment_id}/{run_id}/artifacts/{path}"


def test_artifacts_round_trip_byte_identical_and_land_in_the_bucket(
    tracking, run, setup, mode, moto_s3, tmp_path
):
    _, run_id = run
    large = random_file(tmp_path / "up" / "weights.bin", LARGE_BYTES)
    small = random_file(tmp_path / "up" / "config.json", 1234)

    info = tracking.upload_artifact(run_id, large, "ckpt/weights.bin")
    tracking.upload_artifact(run_id, small, "ckpt/config.json")

    assert info.size_bytes == LARGE_BYTES and info.sha256 == sha256_of(large)
    listed = {f.path: (f.is_dir, f.size_bytes) for f in tracking.list_artifacts(run_id).items}
    assert listed == {"ckpt": (True, 0)}
    listed = {f.path: f.size_bytes for f in tracking.list_artifacts(run_id, "ckpt").items}
    assert listed == {"ckpt/weights.bin": LARGE_BYTES, "ckpt/config.json": 1234}
    for name, source in (("weights.bin", large), ("config.json", small)):
        local = tracking.download_artifact(run_id, f"ckpt/{name}", tmp_path / "down")
        assert sha256_of(local) == sha256_of(source)

    objects = moto_s3.objects(BUCKET, _run_key(setup, run))
    key = _run_key(setup, run, "ckpt/weights.bin")
    assert set(objects) == {key, _run_key(setup, run, "ckpt/config.json")}
    assert objects[key]["size"] == LARGE_BYTES
    parts = multipart_parts(objects[key]["etag"])
    if mode == "proxied-multipart":
        # In MLflow's parts, not boto3's 8 MiB ones: the proxy's multipart protocol was used.
        assert parts == math.ceil(LARGE_BYTES / PROXY_PART_BYTES)
    else:
        assert parts > 1
    assert multipart_parts(objects[_run_key(setup, run, "ckpt/config.json")]["etag"]) == 1


def _object_gets(moto_s3: MotoS3, key: str) -> list[str]:
    """The GET requests of one object in moto's request log."""
    target = f'"GET /{BUCKET}/{key}'
    return [line for line in moto_s3.log_path.read_text().splitlines() if target in line]


@pytest.mark.parametrize("mode", ["proxied"], indirect=True)
def test_a_download_the_server_presigns_is_read_from_the_bucket_not_through_the_server(
    tracking, run, setup, moto_s3, tmp_path
):
    _, run_id = run
    source = random_file(tmp_path / "up" / "weights.bin", LARGE_BYTES)
    tracking.upload_artifact(run_id, source, "ckpt/weights.bin")
    key = _run_key(setup, run, "ckpt/weights.bin")
    assert _object_gets(moto_s3, key) == []

    local = tracking.download_artifact(run_id, "ckpt/weights.bin", tmp_path / "down")

    assert sha256_of(local) == sha256_of(source)
    deadline = time.monotonic() + 10
    while not _object_gets(moto_s3, key) and time.monotonic() < deadline:
        time.sleep(0.05)  # moto logs a request once it has answered it
    gets = _object_gets(moto_s3, key)
    # One GET with the server's signature in the URL; the server itself fetching the object
    # for its proxy would sign in a header instead.
    assert len(gets) == 1 and "X-Amz-Signature=" in gets[0], gets


@pytest.mark.parametrize("mode", ["proxied"], indirect=True)
def test_a_bad_upload_streamed_to_the_s3_proxy_leaves_the_stored_object_as_it_was(
    tracking, run, setup, moto_s3, tmp_path
):
    _, run_id = run
    good = random_file(tmp_path / "good.bin", 3 * MIB)
    tracking.upload_artifact(run_id, good, "ckpt/model.pt")
    key = _run_key(setup, run, "ckpt/model.pt")
    stored = moto_s3.objects(BUCKET, key)[key]

    # Most of these bytes reach MLflow's proxy before the wrong digest is seen at the end.
    bad = os.urandom(8 * MIB)
    stub = pb_grpc.ExperimentTrackingServiceStub(grpc.insecure_channel(setup.sidecar.target))
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadArtifact(
            upload_requests(run_id, "ckpt/model.pt", bad, digest=sha(b"other")), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    time.sleep(1)  # a cut PUT that MLflow would store anyway reaches the bucket by now
    assert moto_s3.objects(BUCKET, key)[key] == stored
    local = tracking.download_artifact(run_id, "ckpt/model.pt", tmp_path / "down")
    assert sha256_of(local) == sha256_of(good)


def test_mlflow_reads_what_the_sidecar_wrote_and_the_other_way(tracking, run, setup, tmp_path):
    _, run_id = run
    plain = MlflowClient(tracking_uri=setup.server.url)
    ours = random_file(tmp_path / "ours" / "policy.pt", LARGE_BYTES)
    theirs = random_file(tmp_path / "theirs" / "replay.bin", 3 * MIB + 17)

    tracking.upload_artifact(run_id, ours, "from-sidecar/policy.pt")
    plain.log_artifact(run_id, str(theirs), "from-mlflow")

    fetched = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="from-sidecar/policy.pt",
        dst_path=str(tmp_path / "plain"),
        tracking_uri=setup.server.url,
    )
    assert sha256_of(Path(fetched)) == sha256_of(ours)
    local = tracking.download_artifact(run_id, "from-mlflow/replay.bin", tmp_path / "sidecar")
    assert sha256_of(local) == sha256_of(theirs)
    listed = {f.path for f in plain.list_artifacts(run_id, "from-sidecar")}
    assert listed == {"from-sidecar/policy.pt"}


def test_model_uploaded_registered_and_downloaded_by_alias_byte_identical(
    container, run, setup, moto_s3, unique, tmp_path, monkeypatch
):
    experiment_id, run_id = run
    model_dir = tmp_path / "model"
    (model_dir / "data").mkdir(parents=True)
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    random_file(model_dir / "data" / "weights.bin", LARGE_BYTES)
    random_file(model_dir / "data" / "optimizer.bin", 2 * MIB + 3)
    expected = tree_digests(model_dir)
    registry = container.model_registry()
    name = f"s3-model-{unique}"

    version = registry.upload_model(name, model_dir, run_id=run_id, aliases=["champion"])

    assert version.version == 1 and version.aliases == ("champion",)
    assert tree_digests(registry.download_model(name, tmp_path / "ours", alias="champion")) == (
        expected
    )
    # MLflow resolves `models:/` partly through the process's default URIs; left unset,
    # the tracking one is `sqlite:///mlflow.db`, which it would create in the working dir.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", setup.server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", setup.server.url)
    fetched = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}@champion",
        dst_path=str(tmp_path / "plain"),
        tracking_uri=setup.server.url,
    )
    # MLflow adds a note of the registered model to what it downloads by `models:/`.
    assert tree_digests(Path(fetched), ignore=frozenset({"registered_model_meta"})) == expected
    stored = moto_s3.objects(BUCKET, _run_key(setup, run))
    model_files = {key.rpartition("/artifacts/")[2].split("/", 2)[-1] for key in stored}
    assert model_files == set(expected)
    assert all(key.startswith(f"{setup.prefix}/{experiment_id}/") for key in stored)


def test_an_s3_location_beyond_the_servers_root_needs_allowed_uris(
    direct_s3, moto_s3, monkeypatch, unique, tmp_path
):
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)
    elsewhere = f"s3://{BUCKET}/team-{unique}"
    plain = MlflowClient(tracking_uri=direct_s3.server.url)
    experiment_id = plain.create_experiment(f"s3-elsewhere-{unique}", artifact_location=elsewhere)
    run_id = plain.create_run(experiment_id).info.run_id
    source = random_file(tmp_path / "up.bin", 1000)

    default = ClientContainer()
    default.config.from_dict({"target": direct_s3.sidecar.target, "timeout_s": 60.0})
    with pytest.raises(PermissionDeniedError) as refused:
        default.experiment_tracking().upload_artifact(run_id, source, "up.bin")
    default.shutdown_resources()
    assert refused.value.reason == ErrorReason.PATH_OUTSIDE_ROOTS
    assert moto_s3.objects(BUCKET, f"team-{unique}/") == {}

    allowing = RunningSidecar(
        sidecar_config(
            tmp_path / "allowing",
            direct_s3.server.url,
            artifacts={"allowed_uris": [elsewhere]},
        )
    )
    container = ClientContainer()
    container.config.from_dict({"target": allowing.target, "timeout_s": 60.0})
    try:
        container.experiment_tracking().upload_artifact(run_id, source, "up.bin")
    finally:
        container.shutdown_resources()
        allowing.stop()
    assert list(moto_s3.objects(BUCKET, f"team-{unique}/")) == [
        f"team-{unique}/{run_id}/artifacts/up.bin"
    ]


def test_a_missing_bucket_is_failed_precondition_naming_it_for_upload_list_and_download(
    direct_s3, moto_s3, monkeypatch, unique, tmp_path
):
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"missing-{unique}"
    plain = MlflowClient(tracking_uri=direct_s3.server.url)
    experiment_id = plain.create_experiment(
        f"s3-no-bucket-{unique}", artifact_location=f"s3://{bucket}/runs"
    )
    run_id = plain.create_run(experiment_id).info.run_id
    source = random_file(tmp_path / "up.bin", 1000)
    allowing = RunningSidecar(
        sidecar_config(
            tmp_path / "allowing",
            direct_s3.server.url,
            artifacts={"allowed_uris": [f"s3://{bucket}"]},
        )
    )
    container = ClientContainer()
    container.config.from_dict({"target": allowing.target, "timeout_s": 60.0})
    tracking = container.experiment_tracking()
    refusals = []
    try:
        for operation in (
            lambda: tracking.upload_artifact(run_id, source, "up.bin"),
            lambda: tracking.list_artifacts(run_id),
            lambda: tracking.download_artifact(run_id, "up.bin", tmp_path / "down"),
        ):
            with pytest.raises(FailedPreconditionError) as refused:
                operation()
            refusals.append(refused.value)
    finally:
        container.shutdown_resources()
        allowing.stop()
    # Not RUN_NOT_FOUND: the run exists, its bucket does not.
    assert [error.reason for error in refusals] == [ErrorReason.ARTIFACT_BUCKET_MISSING] * 3
    assert all(error.metadata.get("bucket") == bucket for error in refusals)
    assert all(repr(bucket) in str(error) for error in refusals)


def test_an_s3_endpoint_nothing_listens_on_is_unavailable_after_the_sidecars_retries(
    moto_s3, monkeypatch, tracking_for_direct, unique, tmp_path, caplog
):
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)
    experiment = tracking_for_direct.create_experiment(f"s3-down-{unique}")
    run_id = tracking_for_direct.start_run(experiment.experiment_id).run_id
    source = random_file(tmp_path / "up.bin", 1000)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING), pytest.raises(UnavailableError) as down:
        tracking_for_direct.upload_artifact(run_id, source, "up.bin")
    assert down.value.reason == ErrorReason.ARTIFACT_STORE_UNAVAILABLE
    assert "artifact store is unavailable" in str(down.value)
    assert "MLflow is unavailable" not in str(down.value)
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retried, "the sidecar gave up without a retry"


def test_the_s3_extra_brings_what_mlflows_s3_repository_imports():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert [re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in extras["s3"]] == ["boto3"]
    assert "import boto3" in Path(s3_artifact_repo.__file__).read_text()
