"""The typed client: registry flows through `ClientContainer().model_registry()`."""

from __future__ import annotations

import pytest

from mlflow_sidecar.client.ports import ModelRegistry
from mlflow_sidecar.core.domain import ModelVersion, ModelVersionStatus, RegisteredModel
from mlflow_sidecar.core.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError


@pytest.fixture()
def registry(client_container) -> ModelRegistry:
    return client_container.model_registry()


def test_register_tag_alias_and_resolve(registry, run_id, unique):
    name = f"client-{unique}"
    model = registry.create_registered_model(name, description="ppo", tags={"team": "rl"})
    assert isinstance(model, RegisteredModel)
    assert (model.name, model.description, dict(model.tags)) == (name, "ppo", {"team": "rl"})
    assert registry.create_registered_model(name, get_if_exists=True) == model

    first = registry.create_model_version(name, source=f"runs:/{run_id}/model", tags={"r": "1"})
    second = registry.create_model_version(name, run_id=run_id, artifact_path="agents/ppo")
    copy_name = f"client-copy-{unique}"
    registry.create_registered_model(copy_name)
    copied = registry.create_model_version(copy_name, source=f"models:/{name}/1")
    assert isinstance(first, ModelVersion)
    assert (first.version, second.version, copied.version) == (1, 2, 1)
    assert first.status is second.status is copied.status is ModelVersionStatus.READY
    assert first.source == f"runs:/{run_id}/model" and first.run_id == run_id
    assert second.source == f"runs:/{run_id}/agents/ppo" and second.run_id == run_id
    assert copied.source == f"models:/{name}/1" and copied.run_id == run_id
    assert dict(first.tags) == {"r": "1"}
    assert first.creation_time_ms > 0 and first.last_updated_time_ms >= first.creation_time_ms

    registry.set_model_alias(name, "champion", 1)
    registry.set_model_version_tag(name, 1, "validated", "yes")
    champion = registry.get_model_version_by_alias(name, "champion")
    assert champion.version == 1
    assert champion.aliases == ("champion",)
    assert dict(champion.tags) == {"r": "1", "validated": "yes"}
    assert registry.get_registered_model(name).aliases == {"champion": 1}
    assert registry.get_latest_model_version(name).version == 2

    registry.set_model_alias(name, "champion", 2)
    assert registry.get_model_version_by_alias(name, "champion").version == 2
    registry.delete_model_version_tag(name, 1, "validated")
    assert dict(registry.get_model_version(name, 1).tags) == {"r": "1"}
    assert registry.update_model_version(name, 1, description="retired").description == "retired"
    registry.delete_model_alias(name, "champion")
    with pytest.raises(NotFoundError):
        registry.get_model_version_by_alias(name, "champion")
    registry.delete_model_version(name, 2)
    assert registry.get_latest_model_version(name).version == 1


def test_registered_model_lifecycle_and_search(registry, unique):
    names = [f"client-page-{unique}-{i}" for i in range(5)]
    for name in names:
        registry.create_registered_model(name)
    seen: list[str] = []
    token = ""
    while True:
        page = registry.search_registered_models(
            filter_string=f"name LIKE 'client-page-{unique}-%'",
            order_by=["name ASC"],
            page_size=2,
            page_token=token,
        )
        assert len(page.items) <= 2
        seen += [m.name for m in page.items]
        token = page.next_page_token
        if not token:
            break
    assert seen == names

    registry.set_registered_model_tag(names[0], "stage", "dev")
    registry.delete_registered_model_tag(names[0], "stage")
    assert registry.update_registered_model(names[0], description="d").description == "d"
    renamed = registry.rename_registered_model(names[0], f"client-renamed-{unique}")
    assert renamed.name == f"client-renamed-{unique}" and renamed.description == "d"
    assert renamed.tags == {}
    registry.delete_registered_model(renamed.name)
    with pytest.raises(NotFoundError):
        registry.get_registered_model(renamed.name)


def test_search_model_versions_pages(registry, run_id, unique):
    name = f"client-versions-{unique}"
    registry.create_registered_model(name)
    for i in range(5):
        registry.create_model_version(name, source=f"runs:/{run_id}/m{i}")
    seen: list[int] = []
    token = ""
    while True:
        page = registry.search_model_versions(
            filter_string=f"name = '{name}'",
            order_by=["version_number DESC"],
            page_size=2,
            page_token=token,
        )
        seen += [v.version for v in page.items]
        token = page.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]


def test_domain_errors(registry, run_id, unique):
    name = f"client-errors-{unique}"
    registry.create_registered_model(name)
    with pytest.raises(AlreadyExistsError):
        registry.create_registered_model(name)
    with pytest.raises(NotFoundError):
        registry.get_registered_model(f"missing-{unique}")
    with pytest.raises(NotFoundError):
        registry.get_model_version(name, 1)
    with pytest.raises(NotFoundError):
        registry.get_latest_model_version(name)
    registry.create_model_version(name, source=f"runs:/{run_id}/model")
    for alias in ("latest", "v3", "V12"):
        with pytest.raises(InvalidArgumentError) as err:
            registry.set_model_alias(name, alias, 1)
        assert err.value.field == "alias"
    with pytest.raises(InvalidArgumentError) as err:
        registry.get_model_version(name, 0)
    assert err.value.field == "version"
    with pytest.raises(InvalidArgumentError) as err:
        registry.create_registered_model("")
    assert err.value.field == "name"
    registry.delete_model_version(name, 1)
    with pytest.raises(NotFoundError):
        registry.set_model_alias(name, "champion", 1)
