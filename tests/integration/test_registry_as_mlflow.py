"""Registry answers that match MLflow's own, through the raw RPCs and `sidecar://`,
checked against the real server."""

from __future__ import annotations

from mlflow import MlflowClient

from mlflow_sidecar.v1 import registry_pb2 as pb
from tests.integration.conftest import RunningSidecar


def _client(sidecar: RunningSidecar) -> MlflowClient:
    uri = f"sidecar://{sidecar.target}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_name_with_both_quote_characters_works_like_any_other(
    sidecar: RunningSidecar, registry_stub, run_id: str, unique: str
) -> None:
    name = f'q-{unique}-it\'s "v2"'
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))
    # A name the LIKE fallback also matches must not be taken for it.
    twin = f'q-{unique}-itXs "v2"'
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=twin))
    for model in (twin, twin, name):
        registry_stub.CreateModelVersion(
            pb.CreateModelVersionRequest(name=model, source=f"runs:/{run_id}/model")
        )
    latest = registry_stub.GetLatestModelVersion(
        pb.GetLatestModelVersionRequest(name=name)
    ).model_version
    assert (latest.name, latest.version) == (name, 1)

    client = _client(sidecar)
    assert [v.version for v in client.get_registered_model(name).latest_versions] == ["1"]
    assert [v.version for v in client.get_latest_versions(name)] == ["1"]
    client.set_registered_model_alias(name, "champ", 1)
    assert client.get_model_version_by_alias(name, "champ").version == "1"
    client.delete_registered_model(name)
    assert client.get_registered_model(twin).name == twin
