"""Model registry error paths and their exact status codes, against a real mlflow server."""

from __future__ import annotations

import grpc
import mlflow
import pytest

from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2 as tracking_pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@pytest.fixture()
def model(registry_stub, run_id, unique) -> str:
    """A registered model with versions 1 and 2 (from `run_id`) and alias champion -> 1."""
    name = f"errors-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))
    for path in ("a", "b"):
        registry_stub.CreateModelVersion(
            pb.CreateModelVersionRequest(name=name, source=f"runs:/{run_id}/{path}")
        )
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=1))
    return name


# -- NOT_FOUND --------------------------------------------------------------------------

UNKNOWN_MODEL_CALLS = {
    "GetRegisteredModel": pb.GetRegisteredModelRequest(name="{missing}"),
    "UpdateRegisteredModel": pb.UpdateRegisteredModelRequest(name="{missing}", description="d"),
    "RenameRegisteredModel": pb.RenameRegisteredModelRequest(name="{missing}", new_name="{new}"),
    "DeleteRegisteredModel": pb.DeleteRegisteredModelRequest(name="{missing}"),
    "SetRegisteredModelTag": pb.SetRegisteredModelTagRequest(name="{missing}", key="k", value="v"),
    "DeleteRegisteredModelTag": pb.DeleteRegisteredModelTagRequest(name="{missing}", key="k"),
    "CreateModelVersion": pb.CreateModelVersionRequest(name="{missing}", source="models:/x/1"),
    "GetModelVersion": pb.GetModelVersionRequest(name="{missing}", version=1),
    "GetModelVersionByAlias": pb.GetModelVersionByAliasRequest(name="{missing}", alias="champion"),
    "GetLatestModelVersion": pb.GetLatestModelVersionRequest(name="{missing}"),
    "UpdateModelVersion": pb.UpdateModelVersionRequest(
        name="{missing}", version=1, description="d"
    ),
    "DeleteModelVersion": pb.DeleteModelVersionRequest(name="{missing}", version=1),
    "SetModelVersionTag": pb.SetModelVersionTagRequest(
        name="{missing}", version=1, key="k", value="v"
    ),
    "DeleteModelVersionTag": pb.DeleteModelVersionTagRequest(name="{missing}", version=1, key="k"),
    "SetModelAlias": pb.SetModelAliasRequest(name="{missing}", alias="champion", version=1),
    "DeleteModelAlias": pb.DeleteModelAliasRequest(name="{missing}", alias="champion"),
}


def _with_names(request, **names: str):
    """A copy of `request` with "{missing}"/"{new}" placeholders in string fields filled in."""
    filled = type(request)()
    filled.CopyFrom(request)
    for field, value in request.ListFields():
        if isinstance(value, str) and value.startswith("{"):
            setattr(filled, field.name, value.format(**names))
    return filled


@pytest.mark.parametrize("method", sorted(UNKNOWN_MODEL_CALLS))
def test_unknown_model_is_not_found(registry_stub, unique, method):
    request = _with_names(
        UNKNOWN_MODEL_CALLS[method], missing=f"missing-{unique}", new=f"new-{unique}"
    )
    err = _error(lambda: getattr(registry_stub, method)(request))
    assert err.code() == NOT_FOUND, err.details()
    assert f"missing-{unique}" in err.details()
    # The reason names what is missing: the model, not a version or alias of it.
    assert error_from_rpc(err).reason == ErrorReason.MODEL_NOT_FOUND, err.details()


UNKNOWN_VERSION_CALLS = {
    "GetModelVersion": pb.GetModelVersionRequest(version=7),
    "UpdateModelVersion": pb.UpdateModelVersionRequest(version=7, description="d"),
    "DeleteModelVersion": pb.DeleteModelVersionRequest(version=7),
    "SetModelVersionTag": pb.SetModelVersionTagRequest(version=7, key="k", value="v"),
    "DeleteModelVersionTag": pb.DeleteModelVersionTagRequest(version=7, key="k"),
    "SetModelAlias": pb.SetModelAliasRequest(version=7, alias="champion"),
}


@pytest.mark.parametrize("method", sorted(UNKNOWN_VERSION_CALLS))
def test_unknown_version_is_not_found(registry_stub, model, method):
    request = type(UNKNOWN_VERSION_CALLS[method])()
    request.CopyFrom(UNKNOWN_VERSION_CALLS[method])
    request.name = model
    err = _error(lambda: getattr(registry_stub, method)(request))
    assert err.code() == NOT_FOUND, err.details()
    assert error_from_rpc(err).reason == ErrorReason.MODEL_VERSION_NOT_FOUND
    # The failed SetModelAlias left the alias where it was.
    champion = registry_stub.GetModelVersionByAlias(
        pb.GetModelVersionByAliasRequest(name=model, alias="champion")
    )
    assert champion.model_version.version == 1


def test_unknown_alias_is_not_found(registry_stub, model):
    for method, request in (
        ("GetModelVersionByAlias", pb.GetModelVersionByAliasRequest(name=model, alias="nobody")),
        ("DeleteModelAlias", pb.DeleteModelAliasRequest(name=model, alias="nobody")),
    ):
        err = _error(lambda method=method, request=request: getattr(registry_stub, method)(request))
        assert err.code() == NOT_FOUND, (method, err.details())
        assert error_from_rpc(err).reason == ErrorReason.ALIAS_NOT_FOUND, method


def test_latest_version_of_a_model_without_versions_is_not_found(registry_stub, unique):
    name = f"empty-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))
    err = _error(
        lambda: registry_stub.GetLatestModelVersion(pb.GetLatestModelVersionRequest(name=name))
    )
    assert err.code() == NOT_FOUND
    assert error_from_rpc(err).reason == ErrorReason.MODEL_VERSION_NOT_FOUND


def test_alias_on_a_deleted_version_is_not_found(registry_stub, model):
    registry_stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=model, version=2))
    err = _error(
        lambda: registry_stub.SetModelAlias(
            pb.SetModelAliasRequest(name=model, alias="challenger", version=2)
        )
    )
    assert err.code() == NOT_FOUND
    assert registry_stub.GetRegisteredModel(
        pb.GetRegisteredModelRequest(name=model)
    ).registered_model.aliases == {"champion": 1}


def test_version_from_an_unknown_run_is_not_found(registry_stub, model):
    missing_run = "0" * 32
    for request in (
        pb.CreateModelVersionRequest(name=model, source=f"runs:/{missing_run}/model"),
        pb.CreateModelVersionRequest(name=model, run_id=missing_run, artifact_path="model"),
    ):
        err = _error(lambda request=request: registry_stub.CreateModelVersion(request))
        assert err.code() == NOT_FOUND, err.details()
    latest = registry_stub.GetLatestModelVersion(pb.GetLatestModelVersionRequest(name=model))
    assert latest.model_version.version == 2


def test_version_from_an_unknown_models_source_is_not_found(registry_stub, model, unique):
    for source in (f"models:/{model}/9", f"models:/missing-{unique}/1", f"models:/{model}@nobody"):
        err = _error(
            lambda source=source: registry_stub.CreateModelVersion(
                pb.CreateModelVersionRequest(name=model, source=source)
            )
        )
        assert err.code() == NOT_FOUND, (source, err.details())


def test_version_from_a_missing_logged_model_says_so(registry_stub, model):
    # MLflow 3's models:/<model id>: the logged model is what is missing, not a version.
    err = _error(
        lambda: registry_stub.CreateModelVersion(
            pb.CreateModelVersionRequest(name=model, source=f"models:/m-{'0' * 32}")
        )
    )
    assert err.code() == NOT_FOUND, err.details()
    error = error_from_rpc(err)
    assert error.reason == ErrorReason.LOGGED_MODEL_NOT_FOUND, err.details()
    # MLflow refused it: its own code is in the metadata, as for every refusal of MLflow's.
    assert error.metadata["mlflow_error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert not err.details().startswith("RESOURCE_DOES_NOT_EXIST"), err.details()


# -- ALREADY_EXISTS ---------------------------------------------------------------------


def test_duplicate_registered_model_name_already_exists(
    registry_stub, model, unique, mlflow_server
):
    err = _error(
        lambda: registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=model))
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert model in err.details()
    other = f"other-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=other))
    err = _error(
        lambda: registry_stub.RenameRegisteredModel(
            pb.RenameRegisteredModelRequest(name=other, new_name=model)
        )
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    # Both models are untouched.
    assert (
        registry_stub.GetLatestModelVersion(
            pb.GetLatestModelVersionRequest(name=model)
        ).model_version.version
        == 2
    )
    assert registry_stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=other))
    # Not even the rename's own tag (which the sidecar's answers hide) is left behind.
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert "mlflow_sidecar.rename_request_id" not in plain.get_registered_model(other).tags


# -- INVALID_ARGUMENT -------------------------------------------------------------------


def test_a_source_mlflow_refuses_is_named(registry_stub, model, run_id, tracking_stub):
    # MLflow wants the run of a source under a run's artifacts, and names no field.
    experiment_id = tracking_stub.GetRun(
        tracking_pb.GetRunRequest(run_id=run_id)
    ).run.info.experiment_id
    source = f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts/model"
    err = _error(
        lambda: registry_stub.CreateModelVersion(
            pb.CreateModelVersionRequest(name=model, source=source)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert error_from_rpc(err).field == "source", err.details()


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v3", "V12", "v0"])
def test_reserved_alias_is_invalid(registry_stub, model, alias):
    err = _error(
        lambda: registry_stub.SetModelAlias(
            pb.SetModelAliasRequest(name=model, alias=alias, version=1)
        )
    )
    assert err.code() == INVALID
    assert error_from_rpc(err).field == "alias"
    assert error_from_rpc(err).reason == ErrorReason.RESERVED_ALIAS
    aliases = registry_stub.GetRegisteredModel(
        pb.GetRegisteredModelRequest(name=model)
    ).registered_model.aliases
    assert aliases == {"champion": 1}


@pytest.mark.parametrize("alias", ["", " ", "has space", "a/b", "x" * 256])
def test_malformed_alias_is_invalid(registry_stub, model, alias):
    for method, request in (
        ("SetModelAlias", pb.SetModelAliasRequest(name=model, alias=alias, version=1)),
        ("GetModelVersionByAlias", pb.GetModelVersionByAliasRequest(name=model, alias=alias)),
        ("DeleteModelAlias", pb.DeleteModelAliasRequest(name=model, alias=alias)),
    ):
        err = _error(lambda method=method, request=request: getattr(registry_stub, method)(request))
        assert err.code() == INVALID, (method, err.details())
        assert error_from_rpc(err).field == "alias", (method, err.details())


VERSION_CALLS = {
    "GetModelVersion": lambda name, v: pb.GetModelVersionRequest(name=name, version=v),
    "UpdateModelVersion": lambda name, v: pb.UpdateModelVersionRequest(
        name=name, version=v, description="d"
    ),
    "DeleteModelVersion": lambda name, v: pb.DeleteModelVersionRequest(name=name, version=v),
    "SetModelVersionTag": lambda name, v: pb.SetModelVersionTagRequest(
        name=name, version=v, key="k", value="v"
    ),
    "DeleteModelVersionTag": lambda name, v: pb.DeleteModelVersionTagRequest(
        name=name, version=v, key="k"
    ),
    "SetModelAlias": lambda name, v: pb.SetModelAliasRequest(name=name, alias="best", version=v),
}


@pytest.mark.parametrize("version", [0, -1, -(2**63)])
@pytest.mark.parametrize("method", sorted(VERSION_CALLS))
def test_version_below_one_is_invalid(registry_stub, model, method, version):
    err = _error(lambda: getattr(registry_stub, method)(VERSION_CALLS[method](model, version)))
    assert err.code() == INVALID
    assert error_from_rpc(err).field == "version"


EMPTY_NAME_CALLS = {
    "CreateRegisteredModel": pb.CreateRegisteredModelRequest(),
    "GetRegisteredModel": pb.GetRegisteredModelRequest(),
    "UpdateRegisteredModel": pb.UpdateRegisteredModelRequest(description="d"),
    "RenameRegisteredModel": pb.RenameRegisteredModelRequest(new_name="x"),
    "DeleteRegisteredModel": pb.DeleteRegisteredModelRequest(),
    "SetRegisteredModelTag": pb.SetRegisteredModelTagRequest(key="k", value="v"),
    "DeleteRegisteredModelTag": pb.DeleteRegisteredModelTagRequest(key="k"),
    "CreateModelVersion": pb.CreateModelVersionRequest(source="models:/x/1"),
    "GetModelVersion": pb.GetModelVersionRequest(version=1),
    "GetModelVersionByAlias": pb.GetModelVersionByAliasRequest(alias="champion"),
    "GetLatestModelVersion": pb.GetLatestModelVersionRequest(),
    "UpdateModelVersion": pb.UpdateModelVersionRequest(version=1, description="d"),
    "DeleteModelVersion": pb.DeleteModelVersionRequest(version=1),
    "SetModelVersionTag": pb.SetModelVersionTagRequest(version=1, key="k", value="v"),
    "DeleteModelVersionTag": pb.DeleteModelVersionTagRequest(version=1, key="k"),
    "SetModelAlias": pb.SetModelAliasRequest(alias="champion", version=1),
    "DeleteModelAlias": pb.DeleteModelAliasRequest(alias="champion"),
}


@pytest.mark.parametrize("blank", ["", "   "])
@pytest.mark.parametrize("method", sorted(EMPTY_NAME_CALLS))
def test_empty_name_is_invalid(registry_stub, method, blank):
    request = type(EMPTY_NAME_CALLS[method])()
    request.CopyFrom(EMPTY_NAME_CALLS[method])
    request.name = blank
    err = _error(lambda: getattr(registry_stub, method)(request))
    assert err.code() == INVALID
    assert error_from_rpc(err).field == "name"


def test_empty_new_name_is_invalid(registry_stub, model):
    err = _error(
        lambda: registry_stub.RenameRegisteredModel(
            pb.RenameRegisteredModelRequest(name=model, new_name="")
        )
    )
    assert err.code() == INVALID
    assert error_from_rpc(err).field == "new_name"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({}, "source"),
        ({"run_id": "abc"}, "source"),
        ({"artifact_path": "model"}, "source"),
        ({"source": "models:/x/1", "artifact_path": "model"}, "artifact_path"),
        ({"run_id": "abc", "artifact_path": "../escape"}, "artifact_path"),
        ({"source": "runs:/", "run_id": ""}, "source"),
        ({"source": "runs://abc/model"}, "source"),
        ({"source": "runs:/abc/model", "run_id": "def"}, "run_id"),
        ({"source": "models:/x/1", "tags": {"bad key!": "v"}}, "tags.key"),
    ],
)
def test_malformed_create_model_version_is_invalid(registry_stub, model, fields, named):
    err = _error(
        lambda: registry_stub.CreateModelVersion(pb.CreateModelVersionRequest(name=model, **fields))
    )
    assert err.code() == INVALID, err.details()
    assert error_from_rpc(err).field == f"{named}", err.details()


@pytest.mark.parametrize("page_size", [-1, 1001])
def test_page_size_out_of_range_is_invalid(registry_stub, page_size):
    for call in (
        lambda: registry_stub.SearchRegisteredModels(
            pb.SearchRegisteredModelsRequest(page_size=page_size)
        ),
        lambda: registry_stub.SearchModelVersions(
            pb.SearchModelVersionsRequest(page_size=page_size)
        ),
    ):
        err = _error(call)
        assert err.code() == INVALID
        assert error_from_rpc(err).field == "page_size"


@pytest.mark.parametrize(
    "filter_string",
    # The others fail MLflow's parser itself, or its database, which its server answers
    # with 500.
    [
        "name ~~ 'x'",
        "tags.owner IS NULL",
        "tags.owner IS NOT NULL",
        "version_number = 99999999999999999999",
        "version_number > -99999999999999999999",
    ],
)
def test_malformed_filter_is_invalid(registry_stub, filter_string):
    for call in (
        lambda: registry_stub.SearchRegisteredModels(
            pb.SearchRegisteredModelsRequest(filter=filter_string)
        ),
        lambda: registry_stub.SearchModelVersions(
            pb.SearchModelVersionsRequest(filter=filter_string)
        ),
    ):
        err = _error(call)
        assert err.code() == INVALID, err.details()
        assert error_from_rpc(err).field == "filter", err.details()


def test_malformed_page_token_is_invalid(registry_stub):
    for call in (
        lambda: registry_stub.SearchRegisteredModels(
            pb.SearchRegisteredModelsRequest(page_token="not-a-token")
        ),
        lambda: registry_stub.SearchModelVersions(
            pb.SearchModelVersionsRequest(page_token="not-a-token")
        ),
    ):
        err = _error(call)
        assert err.code() == INVALID
        assert error_from_rpc(err).field == "page_token", err.details()
        assert error_from_rpc(err).reason == ErrorReason.INVALID_PAGE_TOKEN


RESERVED_TAG_CALLS = {
    "CreateRegisteredModel": lambda stub, model, key: stub.CreateRegisteredModel(
        pb.CreateRegisteredModelRequest(name=f"{model}-other", tags={key: "x"})
    ),
    "SetRegisteredModelTag": lambda stub, model, key: stub.SetRegisteredModelTag(
        pb.SetRegisteredModelTagRequest(name=model, key=key, value="x")
    ),
    "DeleteRegisteredModelTag": lambda stub, model, key: stub.DeleteRegisteredModelTag(
        pb.DeleteRegisteredModelTagRequest(name=model, key=key)
    ),
    "SetModelVersionTag": lambda stub, model, key: stub.SetModelVersionTag(
        pb.SetModelVersionTagRequest(name=model, version=1, key=key, value="x")
    ),
    "DeleteModelVersionTag": lambda stub, model, key: stub.DeleteModelVersionTag(
        pb.DeleteModelVersionTagRequest(name=model, version=1, key=key)
    ),
    "CreateModelVersion": lambda stub, model, key: stub.CreateModelVersion(
        pb.CreateModelVersionRequest(name=model, source=f"models:/{model}/1", tags={key: "x"})
    ),
    "UploadModel": lambda stub, model, key: stub.UploadModel(
        iter(
            [
                pb.UploadModelRequest(
                    header=pb.UploadModelHeader(
                        name=model, experiment_id="0", tags={key: "x"}, total_size_bytes=0
                    )
                )
            ]
        )
    ),
}


@pytest.mark.parametrize("method", sorted(RESERVED_TAG_CALLS))
def test_the_sidecars_own_tags_are_not_the_callers_to_set(registry_stub, model, method):
    # A request id tag set by hand would make a later create with that id return this
    # version; one deleted would make a retried create register a second.
    err = _error(
        lambda: RESERVED_TAG_CALLS[method](registry_stub, model, "mlflow_sidecar.request_id")
    )
    assert err.code() == INVALID, err.details()
    assert "the sidecar's own" in err.details()
    version = registry_stub.GetModelVersion(pb.GetModelVersionRequest(name=model, version=1))
    assert "mlflow_sidecar.request_id" not in version.model_version.tags
