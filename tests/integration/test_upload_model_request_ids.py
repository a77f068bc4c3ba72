"""UploadModel's request id is one call's, as for the unary RPCs: a repeat of an upload
that took effect gets its version, another upload under the same id is refused before a
byte of it is stored, also when the request ledger no longer knows the id."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import registry_pb2_grpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.integration.test_artifacts_bad_input import model_requests
from tests.support.processes import MlflowServer

FILES = {"MLmodel": b"flavors: {}\n", "weights.bin": b"first weights"}


def upload(stub, name: str, run_id: str, request_id: str, files=None, **header):
    requests = model_requests(name, run_id, files or FILES)
    requests[0].header.request_id = request_id
    for field, value in header.items():
        if field == "tags":
            requests[0].header.tags.update(value)
        else:
            setattr(requests[0].header, field, value)
    return stub.UploadModel(iter(requests), timeout=60).model_version


def refused(stub, *args, **header) -> None:
    with pytest.raises(grpc.RpcError) as err:
        upload(stub, *args, **header)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    error = error_from_rpc(err.value)
    assert (error.reason, error.field) == (ErrorReason.REQUEST_ID_REUSED, "header.request_id")


def model_exists(stub, name: str) -> bool:
    try:
        stub.GetRegisteredModel(reg_pb.GetRegisteredModelRequest(name=name))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def digest_of(stub, name: str, version: int) -> str:
    answers = stub.DownloadModel(reg_pb.DownloadModelRequest(name=name, version=version))
    first = next(iter(answers))
    answers.cancel()
    return first.manifest.digest


def test_an_upload_id_reused_for_another_model_is_refused_and_stores_nothing(
    registry_stub, run_id, unique
):
    request_id = uuid.uuid4().hex
    first = upload(registry_stub, f"up-a-{unique}", run_id, request_id)
    digest = digest_of(registry_stub, first.name, first.version)

    # Other files under a new name: they would land in the first upload's directory.
    other = {"MLmodel": b"flavors: {}\n", "weights.bin": b"other weights, longer"}
    refused(registry_stub, f"up-b-{unique}", run_id, request_id, other)
    assert not model_exists(registry_stub, f"up-b-{unique}")
    assert digest_of(registry_stub, first.name, first.version) == digest

    again = upload(registry_stub, first.name, run_id, request_id)
    assert (again.name, again.version) == (first.name, first.version)


def test_an_upload_id_reused_with_another_header_is_refused(registry_stub, run_id, unique):
    request_id = uuid.uuid4().hex
    name = f"up-tags-{unique}"
    first = upload(registry_stub, name, run_id, request_id, tags={"stage": "a"})
    refused(registry_stub, name, run_id, request_id, tags={"stage": "b"})
    refused(registry_stub, name, run_id, request_id, tags={"stage": "a"}, description="other")
    versions = registry_stub.SearchModelVersions(
        reg_pb.SearchModelVersionsRequest(filter=f"name = '{name}'")
    ).model_versions
    assert [v.version for v in versions] == [first.version]


@pytest.fixture()
def forgetful(mlflow_server: MlflowServer, tmp_path: Path) -> Iterator[RunningSidecar]:
    """A second sidecar on the same MLflow with a ledger of its own: one that knows no id
    the session's sidecar recorded (as after the ledger's retention, or a lost volume)."""
    running = RunningSidecar(sidecar_config(tmp_path / "data", mlflow_server.url))
    yield running
    running.stop()


def test_without_the_ledger_the_request_id_tag_still_tells_a_repeat_from_a_reuse(
    registry_stub, forgetful, run_id, unique
):
    request_id = uuid.uuid4().hex
    first = upload(registry_stub, f"up-c-{unique}", run_id, request_id)
    with grpc.insecure_channel(forgetful.target) as channel:
        stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
        refused(stub, f"up-d-{unique}", run_id, request_id)
        assert not model_exists(stub, f"up-d-{unique}")
        again = upload(stub, first.name, run_id, request_id)
    assert (again.name, again.version) == (first.name, first.version)


def test_without_the_ledger_another_header_under_the_id_is_still_refused(
    registry_stub, forgetful, run_id, unique
):
    request_id = uuid.uuid4().hex
    name = f"up-e-{unique}"
    first = upload(registry_stub, name, run_id, request_id, description="first", tags={"a": "1"})
    with grpc.insecure_channel(forgetful.target) as channel:
        stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
        refused(stub, name, run_id, request_id, description="second", tags={"a": "1"})
        refused(stub, name, run_id, request_id, description="first", tags={"b": "2"})
        refused(stub, name, run_id, request_id, description="first", tags={"a": "2"})
        again = upload(stub, name, run_id, request_id, description="first", tags={"a": "1"})
    assert (again.name, again.version) == (first.name, first.version)


def test_without_the_ledger_a_create_model_version_id_with_another_request_is_refused(
    registry_stub, forgetful, run_id, unique
):
    name = f"cmv-{unique}"
    registry_stub.CreateRegisteredModel(reg_pb.CreateRegisteredModelRequest(name=name))
    request_id = str(uuid.uuid4())

    def create(stub, **fields):
        request = reg_pb.CreateModelVersionRequest(
            name=name, source=f"runs:/{run_id}/model", request_id=request_id
        )
        for field, value in fields.items():
            if field == "tags":
                request.tags.update(value)
            else:
                setattr(request, field, value)
        return stub.CreateModelVersion(request, timeout=60).model_version

    first = create(registry_stub, description="first", tags={"a": "1"})
    with grpc.insecure_channel(forgetful.target) as channel:
        stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
        for other in (
            {"description": "second", "tags": {"a": "1"}},
            {"description": "first", "tags": {"a": "2"}},
            {"description": "first", "tags": {"a": "1"}, "source": f"runs:/{run_id}/other"},
        ):
            with pytest.raises(grpc.RpcError) as err:
                create(stub, **other)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            error = error_from_rpc(err.value)
            assert (error.reason, error.field) == (ErrorReason.REQUEST_ID_REUSED, "request_id")
        again = create(stub, description="first", tags={"a": "1"})
    assert again.version == first.version


def test_without_the_ledger_an_id_reused_for_another_experiment_is_refused(
    registry_stub, tracking_stub, forgetful, unique
):
    # Uploads that name an experiment (the sidecar makes their run): the version the id
    # made is in a run of the first experiment, never the answer for another one.
    experiments = [
        tracking_stub.CreateExperiment(
            pb.CreateExperimentRequest(name=f"up-exp-{which}-{unique}")
        ).experiment.experiment_id
        for which in ("a", "b")
    ]
    request_id = uuid.uuid4().hex
    name = f"up-f-{unique}"
    first = upload(registry_stub, name, "", request_id, experiment_id=experiments[0])
    with grpc.insecure_channel(forgetful.target) as channel:
        stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
        refused(stub, name, "", request_id, experiment_id=experiments[1])
        again = upload(stub, name, "", request_id, experiment_id=experiments[0])
    assert (again.name, again.version) == (first.name, first.version)
