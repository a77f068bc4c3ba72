"""`RegistryService` rules against an in-memory fake of the MLflow gateway."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from mlflow_sidecar.core.domain import (
    ModelVersion,
    ModelVersionStatus,
    Page,
    RegisteredModel,
    Run,
    RunInfo,
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
from mlflow_sidecar.server.mlflow_gateway.gateway import _search_field
from mlflow_sidecar.server.services import registry as registry_module
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.staging import Staging

PENDING = ModelVersionStatus.PENDING_REGISTRATION
READY = ModelVersionStatus.READY
FAILED = ModelVersionStatus.FAILED_REGISTRATION


class FakeGateway:
    """Just enough of `MlflowGateway` for the registry service, with MLflow's quirks:
    an unset alias is an invalid parameter, and versions may start out pending."""

    def __init__(self) -> None:
        self.models: dict[str, RegisteredModel] = {}
        self.versions: dict[tuple[str, int], ModelVersion] = {}
        self.runs = {"run1", "run2"}
        self.created: list[dict[str, object]] = []
        # Statuses a new version reports on creation and on each later get, in order.
        self.statuses: list[ModelVersionStatus] = [READY]
        self.gets = 0
        self.create_delay_s = 0.0
        self.active = 0
        self.max_active = 0
        self.barrier: threading.Barrier | None = None
        self._guard = threading.Lock()

    def _status(self) -> ModelVersionStatus:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def get_registered_model(self, name: str) -> RegisteredModel:
        if name not in self.models:
            raise NotFoundError(f"Registered Model with name={name} not found")
        return self.models[name]

    def create_registered_model(self, name, *, description, tags, request_id) -> RegisteredModel:
        self.models[name] = RegisteredModel(name=name, description=description, tags=dict(tags))
        return self.models[name]

    def get_run(self, run_id: str) -> Run:
        if run_id not in self.runs:
            raise NotFoundError(f"Run '{run_id}' not found")
        return Run(info=RunInfo(run_id=run_id, experiment_id="0"))

    def create_model_version(
        self, name, *, source, run_id, description, tags, request_id
    ) -> ModelVersion:
        with self._guard:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=10)
            # Read the highest number, take a moment, then write: racy unless serialized.
            number = 1 + max((v for n, v in self.versions if n == name), default=0)
            time.sleep(self.create_delay_s)
            version = ModelVersion(
                name=name,
                version=number,
                source=source,
                run_id=run_id,
                status=self._status(),
                description=description,
                tags=dict(tags),
            )
            self.versions[(name, number)] = version
            self.created.append({"name": name, "source": source, "run_id": run_id})
            return version
        finally:
            with self._guard:
                self.active -= 1

    def get_model_version(self, name: str, version: int) -> ModelVersion:
        self.gets += 1
        if (name, version) not in self.versions:
            raise NotFoundError(f"Model Version (name={name}, version={version}) not found")
        current = self.versions[(name, version)]
        if current.status is PENDING:
            current = replace(current, status=self._status(), status_message="copy failed")
            self.versions[(name, version)] = current
        return current

    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        model = self.get_registered_model(name)
        if alias not in model.aliases:
            raise InvalidArgumentError("", f"Registered model alias {alias} not found.")
        return self.get_model_version(name, model.aliases[alias])

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        model = self.models[name]
        self.models[name] = replace(model, aliases={**model.aliases, alias: version})

    def delete_model_alias(self, name: str, alias: str) -> None:
        model = self.models[name]
        aliases = {a: v for a, v in model.aliases.items() if a != alias}
        self.models[name] = replace(model, aliases=aliases)

    def search_model_versions(self, *, filter_string, order_by, page_size, page_token):
        self.last_filter = filter_string
        assert order_by == ["version_number DESC"]
        found = sorted(
            (v for (n, _), v in self.versions.items() if filter_string == f"name = '{n}'"),
            key=lambda v: -v.version,
        )
        return Page(tuple(found[:page_size]))


@pytest.fixture()
def gateway() -> FakeGateway:
    fake = FakeGateway()
    fake.create_registered_model("agent", description="", tags={}, request_id="setup")
    return fake


@pytest.fixture()
def service(gateway: FakeGateway, tmp_path) -> RegistryService:
    staging = Staging(load_config(data_dir=tmp_path))
    return RegistryService(gateway, staging)  # type: ignore[arg-type]


@pytest.fixture()
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "FIRST_POLL_S", 0.001)
    monkeypatch.setattr(registry_module, "MAX_POLL_S", 0.005)


# -- one registration per model at a time ------------------------------------------------


def test_concurrent_versions_of_one_model_are_created_one_at_a_time(service, gateway):
    gateway.create_delay_s = 0.005
    with ThreadPoolExecutor(max_workers=16) as pool:
        versions = list(
            pool.map(
                lambda i: service.create_model_version("agent", source=f"runs:/run1/m{i}"),
                range(16),
            )
        )
    assert gateway.max_active == 1
    assert sorted(v.version for v in versions) == list(range(1, 17))


def test_versions_of_different_models_are_created_side_by_side(service, gateway):
    gateway.create_registered_model("other", description="", tags={}, request_id="setup")
    # Both creations must be inside the gateway at once to pass the barrier.
    gateway.barrier = threading.Barrier(2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(service.create_model_version, name, source="runs:/run1/m")
            for name in ("agent", "other")
        ]
        versions = [f.result() for f in futures]
    assert [(v.name, v.version) for v in versions] == [("agent", 1), ("other", 1)]
    assert gateway.max_active == 2


def test_no_version_is_created_once_the_deadline_has_passed(service, gateway):
    with call_deadline.deadline_scope(0.0), pytest.raises(DeadlineExceededError):
        service.create_model_version("agent", source="runs:/run1/m")
    assert gateway.created == []


# -- waiting for READY ------------------------------------------------------------------


def test_create_model_version_waits_until_ready(service, gateway, fast_polls):
    gateway.statuses = [PENDING, PENDING, PENDING, READY]
    version = service.create_model_version("agent", source="runs:/run1/m")
    assert version.status is READY
    assert gateway.gets == 3


def test_create_model_version_returns_ready_at_once_without_polling(service, gateway):
    version = service.create_model_version("agent", source="runs:/run1/m")
    assert version.status is READY
    assert gateway.gets == 0


def test_create_model_version_gives_up_at_the_deadline(service, gateway, fast_polls):
    gateway.statuses = [PENDING]
    with call_deadline.deadline_scope(0.2), pytest.raises(DeadlineExceededError) as err:
        service.create_model_version("agent", source="runs:/run1/m")
    assert "version 1 of 'agent'" in err.value.message
    assert gateway.gets >= 1
    assert gateway.versions[("agent", 1)].status is PENDING


def test_create_model_version_waits_no_longer_than_mlflow_would(
    service, gateway, fast_polls, monkeypatch
):
    monkeypatch.setattr(registry_module, "MAX_AWAIT_READY_S", 0.05)
    gateway.statuses = [PENDING]
    with pytest.raises(DeadlineExceededError):
        service.create_model_version("agent", source="runs:/run1/m")


def test_failed_registration_is_a_failed_precondition(service, gateway, fast_polls):
    gateway.statuses = [PENDING, FAILED]
    with pytest.raises(FailedPreconditionError) as err:
        service.create_model_version("agent", source="runs:/run1/m")
    assert "version 1 of 'agent'" in err.value.message
    assert "copy failed" in err.value.message


# -- sources ----------------------------------------------------------------------------


def test_runs_source_carries_its_run_id(service, gateway):
    service.create_model_version("agent", source="runs:/run1/agents/ppo")
    service.create_model_version("agent", source="runs:/run2/m", run_id="run2")
    service.create_model_version("agent", run_id="run1", artifact_path="agents/sac")
    assert gateway.created == [
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
    ],
)
def test_malformed_sources_name_their_field(service, gateway, fields, field):
    with pytest.raises(InvalidArgumentError) as err:
        service.create_model_version("agent", **fields)
    assert err.value.field == field
    assert gateway.created == []


def test_unknown_runs_and_models_sources_are_not_found_and_register_nothing(service, gateway):
    service.create_model_version("agent", source="runs:/run1/m")
    for source in ("runs:/nope/m", "models:/agent/2", "models:/ghost/1", "models:/agent@best"):
        with pytest.raises(NotFoundError):
            service.create_model_version("agent", source=source)
    with pytest.raises(NotFoundError):
        service.create_model_version("ghost", source="runs:/run1/m")
    assert len(gateway.created) == 1


def test_models_sources_by_version_and_alias_are_registered(service, gateway):
    service.create_model_version("agent", source="runs:/run1/m")
    service.set_model_alias("agent", "champion", 1)
    gateway.create_registered_model("copy", description="", tags={}, request_id="setup")
    service.create_model_version("copy", source="models:/agent/1")
    service.create_model_version("copy", source="models:/agent@champion")
    assert [c["source"] for c in gateway.created[1:]] == [
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
    assert gateway.models["agent"].aliases == {}


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v1", "V3"])
def test_reserved_aliases_are_refused_by_every_alias_call(service, gateway, alias, tmp_path):
    """Names SetModelAlias refuses can never resolve: reading, downloading and deleting by
    one is refused the same way, not answered NOT_FOUND or passed to MLflow."""
    service.create_model_version("agent", source="runs:/run1/m")
    calls = [
        lambda: service.get_model_version_by_alias("agent", alias),
        lambda: service.download_model("agent", tmp_path / "dst", alias=alias),
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
    assert gateway.models["agent"].aliases == {}


def test_unset_alias_is_not_found_although_mlflow_calls_it_invalid(service, gateway):
    with pytest.raises(NotFoundError) as err:
        service.get_model_version_by_alias("agent", "champion")
    assert err.value.reason == ErrorReason.ALIAS_NOT_FOUND
    with pytest.raises(NotFoundError):
        service.get_model_version_by_alias("ghost", "champion")
    with pytest.raises(NotFoundError) as err:
        service.delete_model_alias("agent", "champion")
    assert err.value.reason == ErrorReason.ALIAS_NOT_FOUND


def test_other_invalid_answers_for_a_set_alias_stay_invalid(service, gateway, monkeypatch):
    service.create_model_version("agent", source="runs:/run1/m")
    service.set_model_alias("agent", "champion", 1)

    def refuse(name, alias):
        raise InvalidArgumentError("", "something else is wrong")

    monkeypatch.setattr(gateway, "get_model_version_by_alias", refuse)
    with pytest.raises(InvalidArgumentError):
        service.get_model_version_by_alias("agent", "champion")


# -- latest version and names -----------------------------------------------------------


def test_latest_version_is_the_highest_number(service, gateway):
    for i in range(3):
        service.create_model_version("agent", source=f"runs:/run1/m{i}")
    assert service.get_latest_model_version("agent").version == 3
    assert gateway.last_filter == "name = 'agent'"


def test_latest_version_of_a_model_without_versions_is_not_found(service):
    with pytest.raises(NotFoundError) as err:
        service.get_latest_model_version("agent")
    assert err.value.reason == ErrorReason.MODEL_VERSION_NOT_FOUND
    with pytest.raises(NotFoundError) as err:
        service.get_latest_model_version("ghost")
    assert err.value.reason != ErrorReason.MODEL_VERSION_NOT_FOUND


def test_latest_version_quotes_names_with_quotes(service, gateway):
    gateway.create_registered_model("it's", description="", tags={}, request_id="setup")
    with pytest.raises(NotFoundError):
        service.get_latest_model_version("it's")
    assert gateway.last_filter == 'name = "it\'s"'


@pytest.mark.parametrize("name", ["a/b", "a:b"])
def test_new_model_names_must_not_contain_slash_or_colon(service, name):
    with pytest.raises(InvalidArgumentError) as err:
        service.create_registered_model(name)
    assert err.value.field == "name"
    with pytest.raises(InvalidArgumentError) as err:
        service.rename_registered_model("agent", name)
    assert err.value.field == "new_name"


# -- which search field an MLflow complaint is about -------------------------------------


@pytest.mark.parametrize(
    ("message", "given", "field"),
    [
        ("Invalid comparator for attribute: ~~", {"filter_string": "x"}, "filter"),
        ("Invalid attribute key 'bogus' specified.", {"order_by": ["bogus"]}, "order_by"),
        ("anything", {"page_token": "t"}, "page_token"),
        (
            "Invalid page token, could not base64-decode",
            {"filter_string": "x", "page_token": "t"},
            "page_token",
        ),
        (
            "Invalid ordering key in order_by clause 'name SIDEWAYS'.",
            {"filter_string": "x", "order_by": ["name SIDEWAYS"]},
            "order_by",
        ),
        ("Invalid comparator", {"filter_string": "x", "order_by": ["name"]}, ""),
    ],
)
def test_search_complaints_name_their_field(message, given, field):
    args = {"filter_string": "", "order_by": [], "page_token": "", **given}
    assert _search_field(message, **args) == field
