"""Every model registry RPC against a real mlflow server, through the raw generated stubs."""

from __future__ import annotations

import time

import grpc
import pytest

from mlflow_sidecar.core import limits
from mlflow_sidecar.core.errors import error_from_rpc
from mlflow_sidecar.v1 import registry_pb2 as pb


def _model(stub, name: str, **kwargs) -> pb.RegisteredModel:
    return stub.CreateRegisteredModel(
        pb.CreateRegisteredModelRequest(name=name, **kwargs)
    ).registered_model


def _version(stub, name: str, run_id: str, path: str = "model", **kwargs) -> pb.ModelVersion:
    request = pb.CreateModelVersionRequest(name=name, source=f"runs:/{run_id}/{path}", **kwargs)
    return stub.CreateModelVersion(request).model_version


def _get_model(stub, name: str) -> pb.RegisteredModel:
    return stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=name)).registered_model


def _get_version(stub, name: str, version: int) -> pb.ModelVersion:
    return stub.GetModelVersion(pb.GetModelVersionRequest(name=name, version=version)).model_version


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


# -- registered models ------------------------------------------------------------------


def test_create_and_get_registered_model(registry_stub, unique):
    before_ms = int(time.time() * 1000) - 1000
    created = _model(
        registry_stub, f"rm-{unique}", description="PPO agent", tags={"team": "rl", "algo": "ppo"}
    )
    assert created.name == f"rm-{unique}"
    assert created.description == "PPO agent"
    assert dict(created.tags) == {"team": "rl", "algo": "ppo"}
    assert dict(created.aliases) == {}
    assert created.creation_time_ms >= before_ms
    assert created.last_updated_time_ms >= created.creation_time_ms
    assert _get_model(registry_stub, f"rm-{unique}") == created


def test_create_registered_model_get_if_exists_returns_the_existing_one(registry_stub, unique):
    first = _model(registry_stub, f"dup-{unique}", description="first", tags={"a": "1"})
    again = _model(
        registry_stub, f"dup-{unique}", description="second", tags={"b": "2"}, get_if_exists=True
    )
    assert again == first
    fresh = _model(registry_stub, f"fresh-{unique}", description="new", get_if_exists=True)
    assert fresh.name == f"fresh-{unique}" and fresh.description == "new"


def test_search_registered_models_paginates(registry_stub, unique):
    names = [f"page-{unique}-{i}" for i in range(5)]
    for name in names:
        _model(registry_stub, name)
    _model(registry_stub, f"other-{unique}")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = registry_stub.SearchRegisteredModels(
            pb.SearchRegisteredModelsRequest(
                filter=f"name LIKE 'page-{unique}-%'",
                order_by=["name ASC"],
                page_size=2,
                page_token=token,
            )
        )
        assert len(reply.registered_models) <= 2
        seen += [m.name for m in reply.registered_models]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert seen == names
    assert pages == 3


def test_search_registered_models_by_tag(registry_stub, unique):
    _model(registry_stub, f"tagged-{unique}", tags={"owner": f"o-{unique}"})
    _model(registry_stub, f"untagged-{unique}")
    reply = registry_stub.SearchRegisteredModels(
        pb.SearchRegisteredModelsRequest(filter=f"tags.owner = 'o-{unique}'")
    )
    assert [m.name for m in reply.registered_models] == [f"tagged-{unique}"]
    assert reply.next_page_token == ""


def test_update_registered_model_replaces_the_description(registry_stub, unique):
    created = _model(registry_stub, f"upd-{unique}", description="old")
    updated = registry_stub.UpdateRegisteredModel(
        pb.UpdateRegisteredModelRequest(name=f"upd-{unique}", description="new")
    ).registered_model
    assert updated.description == "new"
    assert updated.creation_time_ms == created.creation_time_ms
    assert updated.last_updated_time_ms >= created.last_updated_time_ms
    assert _get_model(registry_stub, f"upd-{unique}").description == "new"


def test_rename_registered_model_keeps_versions_tags_and_aliases(registry_stub, run_id, unique):
    old, new = f"old-{unique}", f"new-{unique}"
    _model(registry_stub, old, tags={"k": "v"})
    _version(registry_stub, old, run_id)
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=old, alias="champion", version=1))
    renamed = registry_stub.RenameRegisteredModel(
        pb.RenameRegisteredModelRequest(name=old, new_name=new)
    ).registered_model
    assert renamed.name == new
    assert dict(renamed.tags) == {"k": "v"}
    assert dict(renamed.aliases) == {"champion": 1}
    version = _get_version(registry_stub, new, 1)
    assert version.name == new and version.run_id == run_id
    assert list(version.aliases) == ["champion"]
    assert _code(lambda: _get_model(registry_stub, old)) == grpc.StatusCode.NOT_FOUND


def test_delete_registered_model_deletes_its_versions(registry_stub, run_id, unique):
    name = f"del-{unique}"
    _model(registry_stub, name)
    _version(registry_stub, name, run_id)
    registry_stub.DeleteRegisteredModel(pb.DeleteRegisteredModelRequest(name=name))
    assert _code(lambda: _get_model(registry_stub, name)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: _get_version(registry_stub, name, 1)) == grpc.StatusCode.NOT_FOUND
    versions = registry_stub.SearchModelVersions(
        pb.SearchModelVersionsRequest(filter=f"name = '{name}'")
    ).model_versions
    assert list(versions) == []


def test_set_and_delete_registered_model_tag(registry_stub, unique):
    name = f"rmtag-{unique}"
    _model(registry_stub, name, tags={"keep": "1"})
    registry_stub.SetRegisteredModelTag(
        pb.SetRegisteredModelTagRequest(name=name, key="stage", value="dev")
    )
    registry_stub.SetRegisteredModelTag(
        pb.SetRegisteredModelTagRequest(name=name, key="stage", value="prod")
    )
    assert dict(_get_model(registry_stub, name).tags) == {"keep": "1", "stage": "prod"}
    registry_stub.DeleteRegisteredModelTag(
        pb.DeleteRegisteredModelTagRequest(name=name, key="stage")
    )
    assert dict(_get_model(registry_stub, name).tags) == {"keep": "1"}


# -- model versions ---------------------------------------------------------------------


def test_create_model_version_from_a_runs_source(registry_stub, run_id, unique):
    name = f"mv-runs-{unique}"
    _model(registry_stub, name)
    before_ms = int(time.time() * 1000) - 1000
    created = _version(
        registry_stub, name, run_id, description="first cut", tags={"reward": "12.5"}
    )
    assert created.name == name
    assert created.version == 1
    assert created.status == pb.MODEL_VERSION_STATUS_READY
    assert created.source == f"runs:/{run_id}/model"
    assert created.run_id == run_id
    assert created.description == "first cut"
    assert dict(created.tags) == {"reward": "12.5"}
    assert list(created.aliases) == []
    assert created.creation_time_ms >= before_ms
    assert created.last_updated_time_ms >= created.creation_time_ms
    assert _get_version(registry_stub, name, 1) == created


def test_create_model_version_from_run_id_and_artifact_path(registry_stub, run_id, unique):
    name = f"mv-path-{unique}"
    _model(registry_stub, name)
    created = registry_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(name=name, run_id=run_id, artifact_path="agents/ppo")
    ).model_version
    assert created.version == 1
    assert created.status == pb.MODEL_VERSION_STATUS_READY
    assert created.source == f"runs:/{run_id}/agents/ppo"
    assert created.run_id == run_id


def test_an_artifact_path_takes_what_the_same_source_takes(registry_stub, run_id, unique):
    # run_id + artifact_path is the runs:/ source written in two fields: one set of rules.
    name = f"mv-path-rules-{unique}"
    _model(registry_stub, name)
    prefix = len(f"runs:/{run_id}/")
    room = limits.MAX_SOURCE_LENGTH - prefix
    longest = "/".join(["p" * 200, "p" * 200, "p" * (room - 402)])
    for path in ("model+v2", "a" * 251, longest):
        created = registry_stub.CreateModelVersion(
            pb.CreateModelVersionRequest(name=name, run_id=run_id, artifact_path=path)
        ).model_version
        assert created.source == f"runs:/{run_id}/{path}"
    for path in (longest + "p", "../other", "a?b", "/abs"):
        with pytest.raises(grpc.RpcError) as err:
            registry_stub.CreateModelVersion(
                pb.CreateModelVersionRequest(name=name, run_id=run_id, artifact_path=path)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert error_from_rpc(err.value).field == "artifact_path", err.value.details()
    listed = registry_stub.SearchModelVersions(
        pb.SearchModelVersionsRequest(filter=f"name = '{name}'")
    ).model_versions
    assert len(listed) == 3


def test_create_model_version_from_a_runs_source_with_its_run_id(registry_stub, run_id, unique):
    name = f"mv-both-{unique}"
    _model(registry_stub, name)
    request = pb.CreateModelVersionRequest(name=name, source=f"runs:/{run_id}/model", run_id=run_id)
    created = registry_stub.CreateModelVersion(request).model_version
    assert created.run_id == run_id and created.status == pb.MODEL_VERSION_STATUS_READY


def test_create_model_version_from_a_models_source(registry_stub, run_id, unique):
    origin, copy = f"mv-origin-{unique}", f"mv-copy-{unique}"
    _model(registry_stub, origin)
    _model(registry_stub, copy)
    _version(registry_stub, origin, run_id)
    created = registry_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(name=copy, source=f"models:/{origin}/1", tags={"from": origin})
    ).model_version
    assert created.name == copy
    assert created.version == 1
    assert created.status == pb.MODEL_VERSION_STATUS_READY
    assert created.source == f"models:/{origin}/1"
    assert created.run_id == run_id
    assert dict(created.tags) == {"from": origin}


def test_versions_are_numbered_in_order(registry_stub, run_id, unique):
    name = f"mv-order-{unique}"
    _model(registry_stub, name)
    numbers = [_version(registry_stub, name, run_id, path=f"m{i}").version for i in range(3)]
    assert numbers == [1, 2, 3]
    model = _get_model(registry_stub, name)
    assert model.last_updated_time_ms >= model.creation_time_ms


def test_get_latest_model_version_is_the_highest_number(registry_stub, run_id, unique):
    name = f"mv-latest-{unique}"
    _model(registry_stub, name)
    for i in range(3):
        _version(registry_stub, name, run_id, path=f"m{i}")
    # An alias on an older version does not make it the latest.
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=1))
    latest = registry_stub.GetLatestModelVersion(
        pb.GetLatestModelVersionRequest(name=name)
    ).model_version
    assert latest.version == 3
    assert latest.source == f"runs:/{run_id}/m2"
    assert latest.status == pb.MODEL_VERSION_STATUS_READY
    registry_stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=name, version=3))
    latest = registry_stub.GetLatestModelVersion(
        pb.GetLatestModelVersionRequest(name=name)
    ).model_version
    assert latest.version == 2
    assert list(latest.aliases) == []
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=2))
    latest = registry_stub.GetLatestModelVersion(
        pb.GetLatestModelVersionRequest(name=name)
    ).model_version
    # The aliases come with it, as with GetModelVersion.
    assert list(latest.aliases) == ["champion"]


def test_get_latest_model_version_counts_past_nine(registry_stub, run_id, unique):
    name = f"mv-ten-{unique}"
    _model(registry_stub, name)
    for i in range(11):
        _version(registry_stub, name, run_id, path=f"m{i}")
    latest = registry_stub.GetLatestModelVersion(
        pb.GetLatestModelVersionRequest(name=name)
    ).model_version
    assert latest.version == 11


def test_search_model_versions_paginates(registry_stub, run_id, unique):
    name = f"mv-search-{unique}"
    _model(registry_stub, name)
    for i in range(5):
        _version(registry_stub, name, run_id, path=f"m{i}")
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        reply = registry_stub.SearchModelVersions(
            pb.SearchModelVersionsRequest(
                filter=f"name = '{name}'",
                order_by=["version_number ASC"],
                page_size=2,
                page_token=token,
            )
        )
        assert len(reply.model_versions) <= 2
        assert all(v.name == name for v in reply.model_versions)
        assert all(v.status == pb.MODEL_VERSION_STATUS_READY for v in reply.model_versions)
        seen += [v.version for v in reply.model_versions]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert seen == [1, 2, 3, 4, 5]
    assert pages == 3


def test_search_model_versions_by_run_id(registry_stub, run_id, unique):
    name = f"mv-byrun-{unique}"
    _model(registry_stub, name)
    _version(registry_stub, name, run_id)
    reply = registry_stub.SearchModelVersions(
        pb.SearchModelVersionsRequest(filter=f"run_id = '{run_id}'")
    )
    assert [(v.name, v.version) for v in reply.model_versions] == [(name, 1)]


def test_update_model_version_replaces_the_description(registry_stub, run_id, unique):
    name = f"mv-upd-{unique}"
    _model(registry_stub, name)
    created = _version(registry_stub, name, run_id, description="old")
    updated = registry_stub.UpdateModelVersion(
        pb.UpdateModelVersionRequest(name=name, version=1, description="new")
    ).model_version
    assert updated.description == "new"
    assert updated.version == 1 and updated.source == created.source
    assert updated.status == pb.MODEL_VERSION_STATUS_READY
    assert updated.last_updated_time_ms >= created.last_updated_time_ms
    assert _get_version(registry_stub, name, 1).description == "new"


def test_delete_model_version_keeps_the_others_and_their_numbers(registry_stub, run_id, unique):
    name = f"mv-del-{unique}"
    _model(registry_stub, name)
    for i in range(2):
        _version(registry_stub, name, run_id, path=f"m{i}")
    registry_stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=name, version=2))
    assert _code(lambda: _get_version(registry_stub, name, 2)) == grpc.StatusCode.NOT_FOUND
    assert _get_version(registry_stub, name, 1).version == 1
    # A deleted number is never handed out again.
    assert _version(registry_stub, name, run_id, path="again").version == 3


def test_set_and_delete_model_version_tag(registry_stub, run_id, unique):
    name = f"mv-tag-{unique}"
    _model(registry_stub, name)
    _version(registry_stub, name, run_id, tags={"keep": "1"})
    registry_stub.SetModelVersionTag(
        pb.SetModelVersionTagRequest(name=name, version=1, key="validated", value="no")
    )
    registry_stub.SetModelVersionTag(
        pb.SetModelVersionTagRequest(name=name, version=1, key="validated", value="yes")
    )
    assert dict(_get_version(registry_stub, name, 1).tags) == {"keep": "1", "validated": "yes"}
    registry_stub.DeleteModelVersionTag(
        pb.DeleteModelVersionTagRequest(name=name, version=1, key="validated")
    )
    assert dict(_get_version(registry_stub, name, 1).tags) == {"keep": "1"}


# -- aliases ----------------------------------------------------------------------------


def test_alias_set_resolve_move_and_delete(registry_stub, run_id, unique):
    name = f"alias-{unique}"
    _model(registry_stub, name)
    for i in range(2):
        _version(registry_stub, name, run_id, path=f"m{i}")
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=1))
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="challenger", version=2))
    champion = registry_stub.GetModelVersionByAlias(
        pb.GetModelVersionByAliasRequest(name=name, alias="champion")
    ).model_version
    assert champion.version == 1
    assert champion.status == pb.MODEL_VERSION_STATUS_READY
    assert list(champion.aliases) == ["champion"]
    assert dict(_get_model(registry_stub, name).aliases) == {"champion": 1, "challenger": 2}

    # Moving an alias takes it off the old version.
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=2))
    champion = registry_stub.GetModelVersionByAlias(
        pb.GetModelVersionByAliasRequest(name=name, alias="champion")
    ).model_version
    assert champion.version == 2
    assert sorted(champion.aliases) == ["challenger", "champion"]
    assert list(_get_version(registry_stub, name, 1).aliases) == []

    registry_stub.DeleteModelAlias(pb.DeleteModelAliasRequest(name=name, alias="champion"))
    assert dict(_get_model(registry_stub, name).aliases) == {"challenger": 2}
    assert list(_get_version(registry_stub, name, 2).aliases) == ["challenger"]
    code = _code(
        lambda: registry_stub.GetModelVersionByAlias(
            pb.GetModelVersionByAliasRequest(name=name, alias="champion")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_deleting_a_version_removes_its_aliases(registry_stub, run_id, unique):
    name = f"alias-del-{unique}"
    _model(registry_stub, name)
    _version(registry_stub, name, run_id)
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=1))
    registry_stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=name, version=1))
    assert dict(_get_model(registry_stub, name).aliases) == {}
    code = _code(
        lambda: registry_stub.GetModelVersionByAlias(
            pb.GetModelVersionByAliasRequest(name=name, alias="champion")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_create_model_version_from_a_models_alias_source(registry_stub, run_id, unique):
    origin, copy = f"mv-aliased-{unique}", f"mv-aliascopy-{unique}"
    _model(registry_stub, origin)
    _model(registry_stub, copy)
    for i in range(2):
        _version(registry_stub, origin, run_id, path=f"m{i}")
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=origin, alias="champion", version=1))
    created = registry_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(name=copy, source=f"models:/{origin}@champion")
    ).model_version
    assert created.version == 1
    assert created.status == pb.MODEL_VERSION_STATUS_READY
    # MLflow pins the alias to the version it pointed at.
    assert created.source == f"models:/{origin}/1"
    assert created.run_id == run_id


def test_descriptions_can_be_cleared(registry_stub, run_id, unique):
    name = f"clear-{unique}"
    _model(registry_stub, name, description="model")
    _version(registry_stub, name, run_id, description="version")
    model = registry_stub.UpdateRegisteredModel(
        pb.UpdateRegisteredModelRequest(name=name, description="")
    ).registered_model
    version = registry_stub.UpdateModelVersion(
        pb.UpdateModelVersionRequest(name=name, version=1, description="")
    ).model_version
    assert model.description == "" and _get_model(registry_stub, name).description == ""
    assert version.description == "" and _get_version(registry_stub, name, 1).description == ""


@pytest.mark.parametrize("rpc", ["SearchModelVersions", "SearchRegisteredModels"])
def test_a_refused_order_by_term_is_named_by_its_index(registry_stub, rpc):
    request = getattr(pb, f"{rpc}Request")(order_by=["name ASC", "no_such_column DESC"])
    with pytest.raises(grpc.RpcError) as err:
        getattr(registry_stub, rpc)(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert error_from_rpc(err.value).field == "order_by[1]", err.value.details()
