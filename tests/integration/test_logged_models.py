"""MLflow 3 logged models through the sidecar's contract (the typed client)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus as MlflowLoggedModelStatus

from mlflow_sidecar.client.grpc_logged_models import GrpcLoggedModels
from mlflow_sidecar.core.errors import (
    ErrorReason,
    InvalidArgumentError,
    NotFoundError,
    error_from_rpc,
)
from mlflow_sidecar.core.logged_models import DatasetUse, LoggedModel, LoggedModelStatus
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar
from tests.support.processes import MlflowServer


@pytest.fixture()
def models(sidecar: RunningSidecar) -> Iterator[GrpcLoggedModels]:
    with grpc.insecure_channel(sidecar.target) as channel:
        yield GrpcLoggedModels(pb_grpc.ExperimentTrackingServiceStub(channel), 60.0)


@pytest.fixture()
def experiment_id(tracking_stub: pb_grpc.ExperimentTrackingServiceStub, unique: str) -> str:
    request = pb.CreateExperimentRequest(name=f"logged-{unique}")
    return str(tracking_stub.CreateExperiment(request).experiment.experiment_id)


def test_a_repeated_create_returns_the_first_model(
    models: GrpcLoggedModels, experiment_id: str, run_id: str, mlflow_server: MlflowServer
) -> None:
    def create() -> LoggedModel:
        return models.create(
            experiment_id,
            name="policy",
            source_run_id=run_id,
            params={"lr": "0.1"},
            tags={"t": "1"},
            request_id=f"create-policy-{experiment_id}",
        )

    first = create()
    assert create().model_id == first.model_id
    direct = MlflowClient(tracking_uri=mlflow_server.url)
    listed = direct.search_logged_models(experiment_ids=[experiment_id])
    assert [m.model_id for m in listed] == [first.model_id]
    assert first.status is LoggedModelStatus.PENDING
    assert dict(first.params) == {"lr": "0.1"} and first.tags["t"] == "1"


def test_lifecycle_files_and_run_links(
    models: GrpcLoggedModels,
    experiment_id: str,
    run_id: str,
    mlflow_server: MlflowServer,
    tmp_path: Path,
) -> None:
    model = models.create(experiment_id, name="net", source_run_id=run_id)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(range(256)) * 4096)
    stored = models.upload_artifact(model.model_id, weights, "data/weights.bin")
    assert stored.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert [(f.path, f.is_dir) for f in models.list_artifacts(model.model_id).items] == [
        ("data", True)
    ]
    back = models.download_artifact(model.model_id, "data/weights.bin", tmp_path / "back")
    assert back.read_bytes() == weights.read_bytes()

    models.set_tags(model.model_id, {"stage": "eval", "gone": "x"})
    models.delete_tag(model.model_id, "gone")
    ready = models.finalize(model.model_id, LoggedModelStatus.READY)
    assert ready.status is LoggedModelStatus.READY
    models.log_outputs(run_id, [(model.model_id, 3)])
    models.log_inputs(
        run_id,
        [DatasetUse("train", "abc123", "local", '{"uri": "x"}', tags={"mlflow.data.context": "t"})],
    )

    direct = MlflowClient(tracking_uri=mlflow_server.url)
    seen = direct.get_logged_model(model.model_id)
    assert seen.tags["stage"] == "eval" and "gone" not in seen.tags
    assert seen.status == MlflowLoggedModelStatus.READY
    run = direct.get_run(run_id)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 3)]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["train"]
    found = models.search([experiment_id], filter_string="name = 'net'")
    assert [m.model_id for m in found.items] == [model.model_id]


def test_missing_models_tags_and_files_say_which(
    models: GrpcLoggedModels, experiment_id: str
) -> None:
    with pytest.raises(NotFoundError) as missing:
        models.get("m-" + "0" * 32)
    assert missing.value.reason == ErrorReason.LOGGED_MODEL_NOT_FOUND
    model = models.create(experiment_id, name="empty")
    with pytest.raises(NotFoundError) as no_tag:
        models.delete_tag(model.model_id, "absent")
    assert no_tag.value.reason == ErrorReason.TAG_NOT_FOUND
    with pytest.raises(NotFoundError) as no_file:
        models.download_artifact(model.model_id, "MLmodel", "/tmp/unused-destination")
    assert no_file.value.reason == ErrorReason.ARTIFACT_NOT_FOUND
    with pytest.raises(InvalidArgumentError) as pending:
        models.finalize(model.model_id, LoggedModelStatus.PENDING)
    assert pending.value.field == "status"
    with pytest.raises(InvalidArgumentError) as bad_id:
        models.get("../etc")
    assert bad_id.value.field == "model_id"


def _model_upload(
    model_id: str, path: str, data: bytes, request_id: str
) -> Iterator[pb.UploadLoggedModelArtifactRequest]:
    yield pb.UploadLoggedModelArtifactRequest(
        header=pb.UploadLoggedModelArtifactHeader(
            model_id=model_id,
            artifact_path=path,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            request_id=request_id,
        )
    )
    yield pb.UploadLoggedModelArtifactRequest(chunk=data)


@pytest.mark.parametrize(
    ("path", "taken"),
    [("d", "directory"), ("d/w.bin/x.bin", "file")],
    ids=["over a directory", "under a file"],
)
def test_a_model_file_its_artifacts_leave_no_room_for_is_refused(
    tracking_stub: pb_grpc.ExperimentTrackingServiceStub,
    models: GrpcLoggedModels,
    experiment_id: str,
    path: str,
    taken: str,
) -> None:
    # MLflow's server fails such a PUT with a bare 500: an UNAVAILABLE no retry gets past.
    model_id = models.create(experiment_id, name="net").model_id
    tracking_stub.UploadLoggedModelArtifact(_model_upload(model_id, "d/w.bin", b"a" * 100, ""))
    with pytest.raises(grpc.RpcError) as err:
        tracking_stub.UploadLoggedModelArtifact(_model_upload(model_id, path, b"b" * 100, ""))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert f"logged model {model_id} has a {taken} at" in error_from_rpc(err.value).message
    listed = models.list_artifacts(model_id, "d")
    assert [(f.path, f.size_bytes) for f in listed.items] == [("d/w.bin", 100)]


def test_a_model_file_upload_repeated_with_its_request_id_has_one_effect(
    tracking_stub: pb_grpc.ExperimentTrackingServiceStub,
    models: GrpcLoggedModels,
    experiment_id: str,
    tmp_path: Path,
) -> None:
    model_id = models.create(experiment_id, name="net").model_id
    first, newer = b"a" * 1000, b"b" * 1000
    request_id = f"model-file-{model_id}"
    answer = tracking_stub.UploadLoggedModelArtifact(
        _model_upload(model_id, "w.bin", first, request_id)
    )
    tracking_stub.UploadLoggedModelArtifact(_model_upload(model_id, "w.bin", newer, ""))
    again = tracking_stub.UploadLoggedModelArtifact(
        _model_upload(model_id, "w.bin", first, request_id)
    )
    assert again == answer
    with pytest.raises(grpc.RpcError) as err:
        tracking_stub.UploadLoggedModelArtifact(_model_upload(model_id, "w.bin", newer, request_id))
    assert error_from_rpc(err.value).reason == "REQUEST_ID_REUSED"
    stored = models.download_artifact(model_id, "w.bin", tmp_path)
    assert Path(stored).read_bytes() == newer


def test_a_repeated_model_output_is_recorded_once(
    tracking_stub: pb_grpc.ExperimentTrackingServiceStub,
    models: GrpcLoggedModels,
    experiment_id: str,
    run_id: str,
    mlflow_server: MlflowServer,
) -> None:
    model_id = models.create(experiment_id, name="net").model_id

    def log(*outputs: tuple[str, int]) -> None:
        request = pb.LogModelOutputsRequest(
            run_id=run_id, models=[pb.ModelOutput(model_id=m, step=s) for m, s in outputs]
        )
        tracking_stub.LogModelOutputs(request)

    log((model_id, 7))
    log((model_id, 7))  # a repeat (grpcurl sends no request id): done already
    with pytest.raises(grpc.RpcError) as clash:
        log((model_id, 8))
    assert error_from_rpc(clash.value).code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as twice:
        log((model_id, 7), (model_id, 7))
    assert error_from_rpc(twice.value).field == "models[1].model_id"
    outputs = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id).outputs
    assert [(o.model_id, o.step) for o in outputs.model_outputs] == [(model_id, 7)]


def test_a_model_output_at_another_step_is_already_exists_naming_the_model_and_its_step(
    tracking_stub: pb_grpc.ExperimentTrackingServiceStub,
    models: GrpcLoggedModels,
    experiment_id: str,
    run_id: str,
) -> None:
    # The proto: ALREADY_EXISTS (metadata "model_id", "step"); the step is the one the run
    # has the model at, which the caller's own request does not tell it.
    model_id = models.create(experiment_id, name="net").model_id
    tracking_stub.LogModelOutputs(
        pb.LogModelOutputsRequest(run_id=run_id, models=[pb.ModelOutput(model_id=model_id, step=7)])
    )
    with pytest.raises(grpc.RpcError) as clash:
        tracking_stub.LogModelOutputs(
            pb.LogModelOutputsRequest(
                run_id=run_id, models=[pb.ModelOutput(model_id=model_id, step=8)]
            )
        )
    error = error_from_rpc(clash.value)
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert error.metadata == {"model_id": model_id, "step": "7"}


@pytest.mark.parametrize(
    ("spoil", "field"),
    [
        ({"name": "n" * 501}, "datasets[0].name"),
        ({"digest": "d" * 37}, "datasets[0].digest"),
        ({"source_type": "s" * 37}, "datasets[0].source_type"),
        ({"tags": {"mlflow.data.context": "v" * 501}}, "datasets[0].tags[mlflow.data.context]"),
        ({"tags": {"k" * 256: "v"}}, "datasets[0].tags.key"),
        ({"tags": {"mlflow_sidecar.x": "v"}}, "datasets[0].tags.key"),
    ],
)
def test_a_dataset_over_mlflows_limits_or_with_a_sidecar_tag_is_refused_naming_the_field(
    models: GrpcLoggedModels, run_id: str, mlflow_server: MlflowServer, spoil, field
) -> None:
    fields = {"name": "train", "digest": "abc123", "source_type": "local", "source": "{}"}
    with pytest.raises(InvalidArgumentError) as err:
        models.log_inputs(run_id, [DatasetUse(**{**fields, **spoil})], [])
    assert err.value.field == field
    inputs = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id).inputs
    assert not inputs.dataset_inputs


def test_the_sidecars_own_tags_are_left_out_of_logged_models_it_returns(
    tracking_stub: pb_grpc.ExperimentTrackingServiceStub, mlflow_server: MlflowServer, unique: str
) -> None:
    experiment_id = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"own-tags-{unique}")
    ).experiment.experiment_id
    created = tracking_stub.CreateLoggedModel(
        pb.CreateLoggedModelRequest(
            experiment_id=experiment_id, name="net", tags={"t": "1"}, request_id=f"own-{unique}"
        )
    ).model
    assert dict(created.tags) == {"t": "1"}
    # As a create through the sidecar would leave it, were it to tag logged models as it
    # tags runs and versions (or as a caller of MLflow did).
    MlflowClient(tracking_uri=mlflow_server.url).set_logged_model_tags(
        created.model_id,
        {"mlflow_sidecar.request_id": "r-1", "mlflow_sidecar.rename_request_id": "r-2"},
    )
    got = tracking_stub.GetLoggedModel(pb.GetLoggedModelRequest(model_id=created.model_id)).model
    found = tracking_stub.SearchLoggedModels(
        pb.SearchLoggedModelsRequest(experiment_ids=[experiment_id])
    ).models
    assert dict(got.tags) == {"t": "1"}
    assert [dict(m.tags) for m in found] == [{"t": "1"}]


def test_an_order_without_ascending_sorts_descending_and_ascending_true_ascending(
    tracking_stub: pb_grpc.ExperimentTrackingServiceStub, experiment_id: str
) -> None:
    # The proto's word on LoggedModelOrder.ascending: left out is false, descending.
    for name in ("b-net", "a-net", "c-net"):
        tracking_stub.CreateLoggedModel(
            pb.CreateLoggedModelRequest(experiment_id=experiment_id, name=name)
        )

    def names(order: pb.LoggedModelOrder) -> list[str]:
        request = pb.SearchLoggedModelsRequest(experiment_ids=[experiment_id], order_by=[order])
        return [model.name for model in tracking_stub.SearchLoggedModels(request).models]

    assert names(pb.LoggedModelOrder(field_name="name")) == ["c-net", "b-net", "a-net"]
    assert names(pb.LoggedModelOrder(field_name="name", ascending=True)) == [
        "a-net",
        "b-net",
        "c-net",
    ]


def test_an_experiment_id_mlflow_refuses_is_named_as_the_field(models: GrpcLoggedModels) -> None:
    # Not a number: the sidecar passes it on, and MLflow's refusal names the field.
    with pytest.raises(InvalidArgumentError) as err:
        models.create("0x1", name="m")
    assert err.value.field == "experiment_id"


@pytest.mark.parametrize(
    "filter_string",
    [
        "foo = 1",
        "attributes.creation_time > 0",
        "last_updated_time = 0",
        "creation_timestamp > 'yesterday'",
        "metrics.loss < low",
        "name IN (policy)",
        "name = (1 +)",
    ],
)
def test_a_filter_mlflows_store_would_fail_on_is_invalid_naming_the_filter(
    models: GrpcLoggedModels, experiment_id: str, filter_string: str
) -> None:
    # MLflow's SQL store answers these with a server error, which reads as an outage.
    with pytest.raises(InvalidArgumentError) as err:
        models.search([experiment_id], filter_string=filter_string)
    assert err.value.field == "filter"


def test_a_filter_on_any_attribute_mlflows_store_has_finds_the_models(
    models: GrpcLoggedModels, experiment_id: str
) -> None:
    made = models.create(experiment_id, name="policy")
    for filter_string in (
        f"experiment_id = '{experiment_id}'",
        "creation_time > 0 AND lifecycle_stage = 'active'",
        "attributes.name = 'policy'",
    ):
        found = models.search([experiment_id], filter_string=filter_string).items
        assert [m.model_id for m in found] == [made.model_id], filter_string
