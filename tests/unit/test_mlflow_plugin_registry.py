"""The `sidecar://` registry store against a fake sidecar registry: what MLflow's own
store would answer, from the sidecar's bounded pages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from mlflow_sidecar.core.domain import ModelVersion, Page, RegisteredModel
from mlflow_sidecar.core.errors import ErrorReason, NotFoundError
from mlflow_sidecar.core.limits import MAX_PAGE_SIZE
from mlflow_sidecar.mlflow_plugin.registry_store import SidecarRegistryStore


@dataclass
class FakeRegistry:
    """The sidecar's registry: bounded pages whose token is the next item's offset."""

    models: list[RegisteredModel] = field(default_factory=list)
    versions: list[ModelVersion] = field(default_factory=list)
    page_sizes: list[int] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def _page(self, items: Sequence[Any], page_size: int, page_token: str) -> Page[Any]:
        assert 1 <= page_size <= MAX_PAGE_SIZE
        self.page_sizes.append(page_size)
        start = int(page_token or 0)
        end = start + page_size
        return Page(tuple(items[start:end]), str(end) if end < len(items) else "")

    def search_model_versions(self, **kwargs: Any) -> Page[ModelVersion]:
        return self._page(self.versions, kwargs["page_size"], kwargs["page_token"])

    def search_registered_models(self, **kwargs: Any) -> Page[RegisteredModel]:
        return self._page(self.models, kwargs["page_size"], kwargs["page_token"])

    def get_registered_model(self, name: str) -> RegisteredModel:
        self.calls.append(("get_registered_model", name))
        for model in self.models:
            if model.name == name:
                return model
        raise NotFoundError(f"no model {name!r}", reason=ErrorReason.MODEL_NOT_FOUND)

    def get_latest_model_version(self, name: str) -> ModelVersion:
        self.calls.append(("get_latest_model_version", name))
        mine = [v for v in self.versions if v.name == name]
        if not mine:
            self.get_registered_model(name)
            raise NotFoundError("no versions", reason=ErrorReason.MODEL_VERSION_NOT_FOUND)
        return max(mine, key=lambda v: v.version)

    def update_registered_model(self, name: str, *, description: str) -> RegisteredModel:
        return RegisteredModel(name, description=description)


def store_of(registry: FakeRegistry) -> SidecarRegistryStore:
    store = SidecarRegistryStore.__new__(SidecarRegistryStore)
    connection = SimpleNamespace(registry=registry, root="sidecar://fake:1")
    store._process_connection = SimpleNamespace(get=lambda: connection)  # type: ignore[assignment]
    store._root = "sidecar://fake:1"
    return store


def test_search_model_versions_answers_mlflows_default_of_10000_in_one_list() -> None:
    registry = FakeRegistry(versions=[ModelVersion("m", i) for i in range(1, 1101)])
    found = store_of(registry).search_model_versions("name='m'")
    assert [v.version for v in found] == [str(i) for i in range(1, 1101)]
    assert found.token is None
    assert max(registry.page_sizes) <= MAX_PAGE_SIZE


def test_search_model_versions_token_follows_the_last_item_returned() -> None:
    registry = FakeRegistry(versions=[ModelVersion("m", i) for i in range(1, 2501)])
    store = store_of(registry)
    first = store.search_model_versions("name='m'", max_results=1500)
    assert [v.version for v in first] == [str(i) for i in range(1, 1501)]
    assert first.token
    rest = store.search_model_versions("name='m'", max_results=5000, page_token=first.token)
    assert [v.version for v in rest] == [str(i) for i in range(1501, 2501)]
    assert rest.token is None


@pytest.mark.parametrize("max_results", [0, -1, 200_001])
def test_search_model_versions_refuses_max_results_mlflow_refuses(max_results: int) -> None:
    with pytest.raises(MlflowException) as caught:
        store_of(FakeRegistry()).search_model_versions("", max_results=max_results)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "max_results" in caught.value.message


def test_search_registered_models_refuses_more_than_mlflows_1000() -> None:
    with pytest.raises(MlflowException) as caught:
        store_of(FakeRegistry()).search_registered_models(max_results=1001)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_tracking_searches_page_through_to_mlflows_max_results() -> None:
    from mlflow_sidecar.core.domain import Experiment
    from mlflow_sidecar.mlflow_plugin.tracking_store import SidecarTrackingStore

    experiments = [Experiment(str(i), f"e{i}") for i in range(1500)]

    def search_experiments(**kwargs: Any) -> Page[Experiment]:
        return FakeRegistry()._page(experiments, kwargs["page_size"], kwargs["page_token"])

    store = SidecarTrackingStore.__new__(SidecarTrackingStore)
    connection = SimpleNamespace(tracking=SimpleNamespace(search_experiments=search_experiments))
    store._process_connection = SimpleNamespace(get=lambda: connection)  # type: ignore[assignment]
    found = store.search_experiments(max_results=1200)
    assert [e.experiment_id for e in found] == [str(i) for i in range(1200)]
    assert found.token
    with pytest.raises(MlflowException):
        store.search_experiments(max_results=50_001)
