"""A request id served by two sidecars at the same moment (a trainer restarted onto a new
pod repeats a call its old sidecar is still serving): a create that loses the race for
the name to the other sidecar's create of the same request returns that one, it is not
ALREADY_EXISTS for the caller's own create."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mlflow_sidecar.core.errors import AlreadyExistsError
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway
from tests.integration.conftest import sidecar_config
from tests.support.processes import MlflowServer


def gateway_on(mlflow_server: MlflowServer, data_dir: Path) -> MlflowGateway:
    gateway = MlflowGateway(sidecar_config(data_dir, mlflow_server.url))
    gateway.open()
    return gateway


def after_the_look(look: Callable[..., Any], other_sidecar: Callable[[], object]) -> Any:
    """`look` (a find before a create) whose first use lets the other sidecar create right
    after it: the create that follows meets the other's."""
    done: list[object] = []

    def looked(*args: Any, **kwargs: Any) -> Any:
        try:
            return look(*args, **kwargs)
        finally:
            if not done:
                done.append(other_sidecar())

    return looked


@pytest.fixture()
def two_sidecars(mlflow_server, tmp_path) -> tuple[MlflowGateway, MlflowGateway]:
    return gateway_on(mlflow_server, tmp_path / "a"), gateway_on(mlflow_server, tmp_path / "b")


def test_an_experiment_created_by_the_other_sidecar_for_the_request_is_returned(
    two_sidecars, monkeypatch, unique
):
    first, second = two_sidecars
    name, request_id = f"two-sidecars-{unique}", f"rid-{unique}"
    made: list[str] = []
    client = first._client  # the MLflow client behind the first sidecar's gateway
    monkeypatch.setattr(
        client,
        "search_experiments",
        after_the_look(
            client.search_experiments,
            lambda: made.append(
                second.create_experiment(name, artifact_location="", tags={}, request_id=request_id)
            ),
        ),
    )
    assert (
        first.create_experiment(name, artifact_location="", tags={}, request_id=request_id)
        == (made[0])
    )
    with pytest.raises(AlreadyExistsError):  # another request's create of the name still is
        second.create_experiment(name, artifact_location="", tags={}, request_id=f"other-{unique}")


def test_a_registered_model_created_by_the_other_sidecar_for_the_request_is_returned(
    two_sidecars, monkeypatch, unique
):
    first, second = two_sidecars
    name, request_id = f"two-sidecars-{unique}", f"rid-{unique}"
    client = first._client
    monkeypatch.setattr(
        client,
        "get_registered_model",
        after_the_look(
            client.get_registered_model,
            lambda: second.create_registered_model(
                name, description="", tags={}, request_id=request_id
            ),
        ),
    )
    model = first.create_registered_model(name, description="", tags={}, request_id=request_id)
    assert model.name == name
    with pytest.raises(AlreadyExistsError):
        second.create_registered_model(name, description="", tags={}, request_id=f"o-{unique}")


def test_a_run_the_other_sidecar_made_for_the_request_meanwhile_is_the_one(
    two_sidecars, monkeypatch, unique
):
    first, second = two_sidecars
    experiment_id = first.create_experiment(
        f"two-sidecars-{unique}", artifact_location="", tags={}, request_id=f"e-{unique}"
    )
    tags = {"mlflow_sidecar.request_id": f"rid-{unique}"}

    def start(gateway: MlflowGateway) -> str:
        return gateway.find_or_create_run(
            experiment_id,
            run_name="",
            tags=tags,
            start_time_ms=0,
            key_tag="mlflow_sidecar.request_id",
        ).info.run_id

    made: list[str] = []
    client = first._client
    monkeypatch.setattr(
        client,
        "search_runs",
        after_the_look(client.search_runs, lambda: made.append(start(second))),
    )
    assert start(first) == made[0]
    monkeypatch.undo()
    live = MlflowClient(tracking_uri=first_uri(first)).search_runs(
        [experiment_id], filter_string=f"tags.`mlflow_sidecar.request_id` = 'rid-{unique}'"
    )
    assert [r.info.run_id for r in live] == made


def test_a_version_the_other_sidecar_registered_for_the_request_meanwhile_is_the_one(
    two_sidecars, monkeypatch, unique
):
    first, second = two_sidecars
    name, request_id = f"two-sidecars-{unique}", f"rid-{unique}"
    first.create_registered_model(name, description="", tags={}, request_id=f"m-{unique}")
    run_id = first.find_or_create_run(
        "0", run_name="", tags={"k": unique}, start_time_ms=0, key_tag="k"
    ).info.run_id

    def register(gateway: MlflowGateway) -> int:
        return gateway.create_model_version(
            name,
            source=f"runs:/{run_id}/model",
            run_id=run_id,
            description="",
            tags={},
            request_id=request_id,
        ).version

    made: list[int] = []
    client = first._client
    monkeypatch.setattr(
        client,
        "search_model_versions",
        after_the_look(client.search_model_versions, lambda: made.append(register(second))),
    )
    assert register(first) == made[0] == 1
    monkeypatch.undo()
    versions = MlflowClient(tracking_uri=first_uri(first)).search_model_versions(f"name = '{name}'")
    assert [int(v.version) for v in versions] == [1]


def first_uri(gateway: MlflowGateway) -> str:
    return str(gateway._client.tracking_uri)
