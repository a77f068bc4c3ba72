"""Registry answers that match MLflow's own, through the raw RPCs and `sidecar://`,
checked against the real server."""

from __future__ import annotations

import grpc
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_sidecar.core import limits
from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import registry_pb2 as pb
from tests.integration.conftest import RunningSidecar, backend_under_test
from tests.support.processes import MlflowServer


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


def test_registered_models_carry_their_latest_version_as_mlflows_do(
    sidecar: RunningSidecar, mlflow_server: MlflowServer, unique: str
) -> None:
    direct = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    for label, client in (("direct", direct), ("sidecar", _client(sidecar))):
        name = f"lv-{label}-{unique}"
        run = client.create_run(client.create_experiment(name)).info.run_id
        client.create_registered_model(name)
        client.create_registered_model(f"{name}-empty")
        for _ in range(2):
            client.create_model_version(name, f"runs:/{run}/m", run)
        found = {m.name: m for m in client.search_registered_models(f"name LIKE '{name}%'")}
        assert [v.version for v in found[name].latest_versions] == ["2"], label
        assert found[f"{name}-empty"].latest_versions == [], label
        updated = client.update_registered_model(name, "desc")
        assert [v.version for v in updated.latest_versions] == ["2"], label


def test_a_whole_run_source_registers_as_mlflow_registers_it(
    sidecar: RunningSidecar, mlflow_server: MlflowServer, unique: str
) -> None:
    direct = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    for label, client in (("direct", direct), ("sidecar", _client(sidecar))):
        name = f"whole-run-{label}-{unique}"
        run = client.create_run(client.create_experiment(name)).info.run_id
        client.create_registered_model(name)
        for source in (f"runs:/{run}", f"runs:/{run}/", f"runs:/{run}/model"):
            version = client.create_model_version(name, source, run)
            assert (version.source, version.run_id) == (source, run), label


def test_a_missing_models_source_names_what_is_missing(registry_stub, run_id: str, unique: str):
    name = f"src-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))
    registry_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(name=name, source=f"runs:/{run_id}/model")
    )
    expected = {
        f"models:/no-such-{unique}/1": ErrorReason.MODEL_NOT_FOUND,
        f"models:/no-such-{unique}@champ": ErrorReason.MODEL_NOT_FOUND,
        f"models:/{name}/9": ErrorReason.MODEL_VERSION_NOT_FOUND,
        f"models:/{name}@champ": ErrorReason.ALIAS_NOT_FOUND,
    }
    for source, reason in expected.items():
        with pytest.raises(grpc.RpcError) as err:
            registry_stub.CreateModelVersion(pb.CreateModelVersionRequest(name=name, source=source))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, (source, err.value.details())
        assert error_from_rpc(err.value).reason == reason, source


def test_a_version_of_a_logged_model_names_it(
    registry_stub, mlflow_server: MlflowServer, unique: str
) -> None:
    direct = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = direct.create_experiment(f"lm-{unique}")
    run = direct.create_run(experiment).info.run_id
    logged = direct.create_logged_model(experiment, source_run_id=run, name="lm")
    name = f"lm-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))
    created = registry_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(name=name, source=f"models:/{logged.model_id}")
    ).model_version
    assert created.model_id == logged.model_id
    read = registry_stub.GetModelVersion(
        pb.GetModelVersionRequest(name=name, version=created.version)
    ).model_version
    assert read.model_id == logged.model_id


def test_the_latest_alias_reads_and_deletes_as_in_mlflow(
    sidecar: RunningSidecar, mlflow_server: MlflowServer, unique: str
) -> None:
    direct = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    for label, client in (("direct", direct), ("sidecar", _client(sidecar))):
        name = f"latest-{label}-{unique}"
        run = client.create_run(client.create_experiment(name)).info.run_id
        client.create_registered_model(name)
        with pytest.raises(MlflowException) as err:
            client.get_model_version_by_alias(name, "latest")
        assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST", label
        for _ in range(2):
            client.create_model_version(name, f"runs:/{run}/m", run)
        assert client.get_model_version_by_alias(name, "latest").version == "2", label
        assert client.get_model_version_by_alias(name, "LATEST").version == "2", label
        client.delete_registered_model_alias(name, "latest")
        client.delete_registered_model_alias(name, "v1")
        with pytest.raises(MlflowException) as err:
            client.delete_registered_model_alias(f"{name}-missing", "latest")
        assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST", label


def test_a_version_below_one_is_refused_as_mlflow_refuses_it(
    sidecar: RunningSidecar, mlflow_server: MlflowServer, unique: str
) -> None:
    missing, invalid = "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"
    direct = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    for label, client in (("direct", direct), ("sidecar", _client(sidecar))):
        name = f"v0-{label}-{unique}"
        client.create_registered_model(name)
        calls = {
            "get 0": (missing, lambda c=client, n=name: c.get_model_version(n, "0")),
            "get -1": (missing, lambda c=client, n=name: c.get_model_version(n, "-1")),
            "delete 0": (missing, lambda c=client, n=name: c.delete_model_version(n, 0)),
            "update -1": (missing, lambda c=client, n=name: c.update_model_version(n, -1, "d")),
            "uri 0": (missing, lambda c=client, n=name: c.get_model_version_download_uri(n, 0)),
            # MLflow reads a tag's version 0 as no version given.
            "tag 0": (invalid, lambda c=client, n=name: c.set_model_version_tag(n, 0, "k", "v")),
            "tag -1": (missing, lambda c=client, n=name: c.set_model_version_tag(n, -1, "k", "v")),
            "untag 0": (invalid, lambda c=client, n=name: c.delete_model_version_tag(n, 0, "k")),
        }
        for what, (code, call) in calls.items():
            with pytest.raises(MlflowException) as err:
                call()
            assert err.value.error_code == code, (label, what)


def test_a_model_search_for_no_models_finds_none_as_mlflow_does(
    sidecar: RunningSidecar, mlflow_server: MlflowServer, unique: str
) -> None:
    direct = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    direct.create_registered_model(f"none-{unique}")
    for label, client in (("direct", direct), ("sidecar", _client(sidecar))):
        for max_results in (0, -1):
            found = client.search_registered_models(max_results=max_results)
            assert list(found) == [], (label, max_results)


def test_a_model_search_survives_a_name_longer_than_a_lookup_takes(
    sidecar: RunningSidecar, mlflow_server: MlflowServer, unique: str
) -> None:
    direct = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    long_name = f"long-{unique}-".ljust(limits.MAX_NAME_LENGTH + 1, "n")
    names = [f"short-{unique}"]
    if backend_under_test() == "postgresql":
        # Its column holds 256 characters: such a model cannot exist there.
        with pytest.raises(MlflowException):
            direct.create_registered_model(long_name)
    else:
        # SQLite ignores column widths, and MLflow's own checks let the name through.
        direct.create_registered_model(long_name)
        names.append(long_name)
    direct.create_registered_model(f"short-{unique}")
    found = _client(sidecar).search_registered_models(f"name LIKE '%{unique}%'")
    assert sorted(m.name for m in found) == sorted(names)
