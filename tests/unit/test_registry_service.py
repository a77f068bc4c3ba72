"""`RegistryService` rules against the in-memory MlflowPort."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlflow_sidecar.core.domain import (
    ModelVersionStatus,
)
from mlflow_sidecar.core.errors import (
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.mlflow_gateway import registration
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.staging import Staging
from tests.fakes.mlflow_port import FakeMlflow

PENDING = ModelVersionStatus.PENDING_REGISTRATION
READY = ModelVersionStatus.READY
FAILED = ModelVersionStatus.FAILED_REGISTRATION


@pytest.fixture()
def gateway() -> FakeMlflow:
    fake = FakeMlflow()
    fake.create_registered_model("agent", description="", tags={}, request_id="setup")
    fake.add_run("run1")
    fake.add_run("run2")
    return fake


@pytest.fixture()
def service(gateway: FakeMlflow, tmp_path) -> RegistryService:
    staging = Staging(load_config(data_dir=tmp_path))
    return RegistryService(gateway, staging)


@pytest.fixture()
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registration, "FIRST_POLL_S", 0.001)
    monkeypatch.setattr(registration, "MAX_POLL_S", 0.005)


def created(gateway: FakeMlflow) -> list[dict[str, object]]:
    """Name, source and run of each version registered, in order."""
    return [
        {k: call[k] for k in ("name", "source", "run_id")}
        for call in gateway.effects("create_model_version")
    ]


# -- one registration per model at a time ------------------------------------------------


def test_concurrent_versions_of_one_model_are_created_one_at_a_time(service, gateway):
    gateway.slow("create_model_version", 0.005)
    with ThreadPoolExecutor(max_workers=16) as pool:
        versions = list(
            pool.map(
                lambda i: service.create_model_version("agent", source=f"runs:/run1/m{i}"),
                range(16),
            )
        )
    assert gateway.max_in_flight["create_model_version"] == 1
    assert sorted(v.version for v in versions) == list(range(1, 17))


def test_versions_of_different_models_are_created_side_by_side(service, gateway):
    gateway.create_registered_model("other", description="", tags={}, request_id="setup")
    # Both creations must be inside the gateway at once to pass the barrier.
    barrier = threading.Barrier(2)
    gateway.on_call("create_model_version", lambda: barrier.wait(timeout=10))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(service.create_model_version, name, source="runs:/run1/m")
            for name in ("agent", "other")
        ]
        versions = [f.result() for f in futures]
    assert [(v.name, v.version) for v in versions] == [("agent", 1), ("other", 1)]
    assert gateway.max_in_flight["create_model_version"] == 2


def test_no_version_is_created_once_the_deadline_has_passed(service, gateway):
    with call_deadline.deadline_scope(0.0), pytest.raises(DeadlineExceededError):
        service.create_model_version("agent", source="runs:/run1/m")
    assert created(gateway) == []


# -- waiting for READY ------------------------------------------------------------------


def test_create_model_version_waits_until_ready(service, gateway, fast_polls):
    gateway.pending_registrations(2)
    version = service.create_model_version("agent", source="runs:/run1/m")
    assert version.status is READY
    assert gateway.calls["get_model_version"] == 3


def test_create_model_version_returns_ready_at_once_without_polling(service, gateway):
    version = service.create_model_version("agent", source="runs:/run1/m")
    assert version.status is READY
    assert gateway.calls["get_model_version"] == 0


def test_create_model_version_gives_up_at_the_deadline(service, gateway, fast_polls):
    gateway.pending_registrations(1_000_000)
    with call_deadline.deadline_scope(0.2), pytest.raises(DeadlineExceededError) as err:
        service.create_model_version("agent", source="runs:/run1/m")
    assert "version 1 of 'agent'" in err.value.message
    assert gateway.calls["get_model_version"] >= 1
    assert gateway.get_model_version("agent", 1).status is PENDING


def test_create_model_version_waits_no_longer_than_mlflow_would(
    service, gateway, fast_polls, monkeypatch
):
    monkeypatch.setattr(registration, "MAX_AWAIT_READY_S", 0.05)
    gateway.pending_registrations(1_000_000)
    with pytest.raises(DeadlineExceededError):
        service.create_model_version("agent", source="runs:/run1/m")


def test_failed_registration_is_a_failed_precondition(service, gateway, fast_polls):
    gateway.pending_registrations(0, FAILED)
    with pytest.raises(FailedPreconditionError) as err:
        service.create_model_version("agent", source="runs:/run1/m")
    assert "version 1 of 'agent'" in err.value.message
    assert "copying the model failed" in err.value.message


# -- sources ----------------------------------------------------------------------------


def test_runs_source_carries_its_run_id(service, gateway):
    service.create_model_version("agent", source="runs:/run1/agents/ppo")
    service.create_model_version("agent", source="runs:/run2/m", run_id="run2")
    service.create_model_version("agent", run_id="run1", artifact_path="agents/sac")
    assert created(gateway) == [
        {"name": "agent", "source": "runs:/run1/agents/ppo", "run_id": "run1"},
        {"name": "agent", "source": "runs:/run2/m", "run_id": "run2"},
        {"name": "agent", "source": "runs:/run1/agents/sac", "run_id": "run1"},
    ]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"source": "runs:/run1/m", "run_id": "run2"}, "run_id"),
        ({"source": "runs:/"}, "source"),
        ({"source": "runs:m"}, "source"),
        ({}, "source"),
        ({"run_id": "run1"}, "source"),
        ({"source": "runs:/run1/m", "artifact_path": "m"}, "artifact_path"),
        ({"run_id": "run1", "artifact_path": "/abs"}, "artifact_path"),
        # A source made of run_id and artifact_path: the fault is in those, not in `source`.
        ({"run_id": "not a run!", "artifact_path": "m"}, "run_id"),
    ],
)
def test_malformed_sources_name_their_field(service, gateway, fields, field):
    with pytest.raises(InvalidArgumentError) as err:
        service.create_model_version("agent", **fields)
    assert err.value.field == field
    assert created(gateway) == []


@pytest.mark.parametrize("source", ["runs:/run1/m\x00", "file:///models/m\x00.pt", "runs:/r\\m"])
def test_a_nul_or_backslash_in_a_source_is_an_unsafe_uri(service, gateway, source):
    with pytest.raises(InvalidArgumentError) as err:
        service.create_model_version("agent", source=source)
    assert (err.value.field, err.value.reason) == ("source", "UNSAFE_URI")
    assert created(gateway) == []


def test_unknown_runs_and_models_sources_are_not_found_and_register_nothing(service, gateway):
    service.create_model_version("agent", source="runs:/run1/m")
    for source in ("runs:/nope/m", "models:/agent/2", "models:/ghost/1", "models:/agent@best"):
        with pytest.raises(NotFoundError):
            service.create_model_version("agent", source=source)
    with pytest.raises(NotFoundError):
        service.create_model_version("ghost", source="runs:/run1/m")
    assert len(created(gateway)) == 1


def test_models_sources_by_version_and_alias_are_registered(service, gateway):
    service.create_model_version("agent", source="runs:/run1/m")
    service.set_model_alias("agent", "champion", 1)
    gateway.create_registered_model("copy", description="", tags={}, request_id="setup")
    service.create_model_version("copy", source="models:/agent/1")
    service.create_model_version("copy", source="models:/agent@champion")
    assert [c["source"] for c in created(gateway)[1:]] == [
        "models:/agent/1",
        "models:/agent@champion",
    ]


# -- aliases ----------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["latest", "Latest", "v1", "V12", "v007"])
def test_reserved_aliases_are_refused(service, gateway, alias):
    service.create_model_version("agent", source="runs:/run1/m")
    with pytest.raises(InvalidArgumentError) as err:
        service.set_model_alias("agent", alias, 1)
    assert err.value.field == "alias"
    assert err.value.reason == ErrorReason.RESERVED_ALIAS
    assert gateway.get_registered_model("agent").aliases == {}


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v1", "V3"])
def test_reserved_aliases_are_refused_by_every_alias_call(service, gateway, alias):
    """Names SetModelAlias refuses can never resolve: reading (which a download by alias
    does first) and deleting by one is refused the same way, not answered NOT_FOUND or
    passed to MLflow."""
    service.create_model_version("agent", source="runs:/run1/m")
    calls = [
        lambda: service.get_model_version_by_alias("agent", alias),
        lambda: service.delete_model_alias("agent", alias),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError) as err:
            call()
        assert (err.value.field, err.value.reason) == ("alias", "RESERVED_ALIAS")
    with pytest.raises(InvalidArgumentError) as err:
        service.create_model_version("agent", source=f"models:/agent@{alias}")
    assert (err.value.field, err.value.reason) == ("source", "RESERVED_ALIAS")


@pytest.mark.parametrize("alias", ["champion", "v1-candidate", "version1", "best_ü", "V"])
def test_ordinary_aliases_are_set(service, gateway, alias):
    service.create_model_version("agent", source="runs:/run1/m")
    service.set_model_alias("agent", alias, 1)
    assert service.get_model_version_by_alias("agent", alias).version == 1


def test_alias_to_a_missing_version_is_not_found(service, gateway):
    with pytest.raises(NotFoundError):
        service.set_model_alias("agent", "champion", 3)
    assert gateway.get_registered_model("agent").aliases == {}


def test_unset_alias_is_not_found_although_mlflow_calls_it_invalid(service, gateway):
    with pytest.raises(NotFoundError) as err:
        service.get_model_version_by_alias("agent", "champion")
    assert err.value.reason == ErrorReason.ALIAS_NOT_FOUND
    with pytest.raises(NotFoundError):
        service.get_model_version_by_alias("ghost", "champion")
    with pytest.raises(NotFoundError) as err:
        service.delete_model_alias("agent", "champion")
    assert err.value.reason == ErrorReason.ALIAS_NOT_FOUND


# -- latest version and names -----------------------------------------------------------


def test_latest_version_is_the_highest_number(service, gateway):
    for i in range(3):
        service.create_model_version("agent", source=f"runs:/run1/m{i}")
    assert service.get_latest_model_version("agent").version == 3


def test_latest_version_of_a_model_without_versions_is_not_found(service):
    with pytest.raises(NotFoundError) as err:
        service.get_latest_model_version("agent")
    assert err.value.reason == ErrorReason.MODEL_VERSION_NOT_FOUND
    with pytest.raises(NotFoundError) as err:
        service.get_latest_model_version("ghost")
    assert err.value.reason != ErrorReason.MODEL_VERSION_NOT_FOUND


@pytest.mark.parametrize("name", ["a/b", "a:b"])
def test_new_model_names_must_not_contain_slash_or_colon(service, name):
    with pytest.raises(InvalidArgumentError) as err:
        service.create_registered_model(name)
    assert err.value.field == "name"
    with pytest.raises(InvalidArgumentError) as err:
        service.rename_registered_model("agent", name)
    assert err.value.field == "new_name"
