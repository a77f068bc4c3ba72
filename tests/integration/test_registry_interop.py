"""The sidecar and a plain MLflow client see the same registry, in both directions."""

from __future__ import annotations

import grpc
import pytest
from mlflow import MlflowClient

from mlflow_sidecar.v1 import registry_pb2 as pb


@pytest.fixture()
def mlflow_client(mlflow_server) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


def test_version_registered_through_the_sidecar_is_seen_by_mlflow(
    registry_stub, mlflow_client, run_id, unique
):
    name = f"interop-out-{unique}"
    registry_stub.CreateRegisteredModel(
        pb.CreateRegisteredModelRequest(name=name, description="ppo", tags={"team": "rl"})
    )
    created = registry_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            name=name,
            source=f"runs:/{run_id}/model",
            description="first",
            tags={"reward": "12.5", "env": "cartpole"},
        )
    ).model_version
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=1))

    model = mlflow_client.get_registered_model(name)
    assert model.description == "ppo"
    # MLflow also shows the sidecar's bookkeeping: the request that created the model.
    assert set(model.tags) == {"team", "mlflow_sidecar.request_id"}
    assert model.tags["team"] == "rl"
    assert model.aliases == {"champion": "1"}

    version = mlflow_client.get_model_version(name, "1")
    assert version.status == "READY"
    assert version.source == f"runs:/{run_id}/model"
    assert version.run_id == run_id
    assert version.description == "first"
    assert version.tags == {
        "reward": "12.5",
        "env": "cartpole",
        "mlflow_sidecar.request_id": version.tags["mlflow_sidecar.request_id"],
    }
    assert version.aliases == ["champion"]
    assert version.creation_timestamp == created.creation_time_ms
    assert version.last_updated_timestamp == created.last_updated_time_ms

    by_alias = mlflow_client.get_model_version_by_alias(name, "champion")
    assert by_alias.version == "1"
    assert by_alias.tags == version.tags


def test_alias_set_with_mlflow_resolves_through_the_sidecar(
    registry_stub, mlflow_client, run_id, unique
):
    name = f"interop-in-{unique}"
    mlflow_client.create_registered_model(name, tags={"owner": "trainer"})
    for path in ("a", "b"):
        mlflow_client.create_model_version(
            name, f"runs:/{run_id}/{path}", run_id=run_id, tags={"path": path}
        )
    mlflow_client.set_registered_model_alias(name, "champion", "2")
    mlflow_client.set_model_version_tag(name, "2", "validated", "yes")

    version = registry_stub.GetModelVersionByAlias(
        pb.GetModelVersionByAliasRequest(name=name, alias="champion")
    ).model_version
    assert version.name == name
    assert version.version == 2
    assert version.status == pb.MODEL_VERSION_STATUS_READY
    assert version.source == f"runs:/{run_id}/b"
    assert version.run_id == run_id
    assert dict(version.tags) == {"path": "b", "validated": "yes"}
    assert list(version.aliases) == ["champion"]

    model = registry_stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=name))
    assert dict(model.registered_model.tags) == {"owner": "trainer"}
    assert dict(model.registered_model.aliases) == {"champion": 2}
    latest = registry_stub.GetLatestModelVersion(pb.GetLatestModelVersionRequest(name=name))
    assert latest.model_version.version == 2

    # Moving the alias with MLflow is seen at once.
    mlflow_client.set_registered_model_alias(name, "champion", "1")
    version = registry_stub.GetModelVersionByAlias(
        pb.GetModelVersionByAliasRequest(name=name, alias="champion")
    ).model_version
    assert version.version == 1 and dict(version.tags) == {"path": "a"}


def test_alias_deleted_with_mlflow_is_not_found_through_the_sidecar(
    registry_stub, mlflow_client, run_id, unique
):
    name = f"interop-del-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))
    registry_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(name=name, source=f"runs:/{run_id}/model")
    )
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=1))
    mlflow_client.delete_registered_model_alias(name, "champion")
    with pytest.raises(grpc.RpcError) as err:
        registry_stub.GetModelVersionByAlias(
            pb.GetModelVersionByAliasRequest(name=name, alias="champion")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_versions_from_both_sides_share_one_numbering(registry_stub, mlflow_client, run_id, unique):
    name = f"interop-num-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))
    numbers = []
    for i in range(4):
        if i % 2:
            mv = mlflow_client.create_model_version(name, f"runs:/{run_id}/m{i}", run_id=run_id)
            numbers.append(int(mv.version))
        else:
            request = pb.CreateModelVersionRequest(name=name, source=f"runs:/{run_id}/m{i}")
            numbers.append(registry_stub.CreateModelVersion(request).model_version.version)
    assert numbers == [1, 2, 3, 4]
    searched = registry_stub.SearchModelVersions(
        pb.SearchModelVersionsRequest(filter=f"name = '{name}'", order_by=["version_number ASC"])
    ).model_versions
    assert [(v.version, v.source) for v in searched] == [
        (i + 1, f"runs:/{run_id}/m{i}") for i in range(4)
    ]
    assert {v.version for v in mlflow_client.search_model_versions(f"name = '{name}'")} == {
        "1",
        "2",
        "3",
        "4",
    }
