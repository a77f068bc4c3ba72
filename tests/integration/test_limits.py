"""Each limit of the contract at its edge, against a real mlflow server: a value at the
limit is accepted and MLflow holds it; one past it is INVALID_ARGUMENT naming the field,
and nothing of the call takes effect. Where MLflow's limit differs by entity (tag values),
the sidecar's is the entity's."""

from __future__ import annotations

import logging

import grpc
import pytest
from mlflow.store.tracking.dbmodels.models import SqlRun
from mlflow.tracking import MlflowClient

from mlflow_sidecar.core import limits
from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2_grpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.integration.test_artifacts_bad_input import model_requests


def refused(call, field: str) -> str:
    """Run `call`, expect INVALID_ARGUMENT on `field`; the message."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert error_from_rpc(err.value).field == field, err.value.details()
    return str(err.value.details())


def test_an_experiment_tag_takes_mlflows_experiment_limit(tracking_stub, unique):
    at_limit = "e" * limits.MAX_EXPERIMENT_TAG_VALUE_LENGTH
    assert limits.MAX_EXPERIMENT_TAG_VALUE_LENGTH > limits.MAX_TAG_VALUE_LENGTH
    experiment = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"limits-{unique}", tags={"long": at_limit})
    ).experiment
    held = tracking_stub.GetExperiment(
        pb.GetExperimentRequest(experiment_id=experiment.experiment_id)
    ).experiment
    assert held.tags["long"] == at_limit
    refused(
        lambda: tracking_stub.CreateExperiment(
            pb.CreateExperimentRequest(name=f"limits-past-{unique}", tags={"long": at_limit + "e"})
        ),
        "tags[long]",
    )
    with pytest.raises(grpc.RpcError) as err:
        tracking_stub.GetExperiment(pb.GetExperimentRequest(name=f"limits-past-{unique}"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_run_tag_keeps_mlflows_run_limit(tracking_stub, run_id):
    at_limit = "r" * limits.MAX_TAG_VALUE_LENGTH
    tracking_stub.SetRunTags(pb.SetRunTagsRequest(run_id=run_id, tags={"long": at_limit}))
    refused(
        lambda: tracking_stub.SetRunTags(
            pb.SetRunTagsRequest(run_id=run_id, tags={"past": at_limit + "r"})
        ),
        "tags[past]",
    )
    tags = tracking_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run.data.tags
    assert tags["long"] == at_limit
    assert "past" not in tags


def test_the_run_name_tag_is_held_to_the_run_names_limit(tracking_stub, run_id):
    # MLflow copies the tag into the run's name column; past its width PostgreSQL refused
    # the batch that held it after the batches before it had landed.
    at_limit = "n" * limits.MAX_KEY_LENGTH
    many = {f"t{i:03}": "v" for i in range(2 * limits.MAX_PARAMS_TAGS_PER_BATCH + 50)}
    refused(
        lambda: tracking_stub.SetRunTags(
            pb.SetRunTagsRequest(run_id=run_id, tags={**many, "mlflow.runName": at_limit + "n"})
        ),
        "tags[mlflow.runName]",
    )
    assert not set(tracking_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run.data.tags) & set(many)
    tracking_stub.SetRunTags(pb.SetRunTagsRequest(run_id=run_id, tags={"mlflow.runName": at_limit}))
    assert tracking_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run.info.run_name == at_limit


def test_a_run_starts_with_a_name_and_user_tag_its_columns_hold(tracking_stub, unique):
    experiment_id = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"run-columns-{unique}")
    ).experiment.experiment_id
    name, user = "n" * limits.MAX_KEY_LENGTH, "u" * limits.MAX_RUN_USER_LENGTH
    for tags, field in [
        ({"mlflow.runName": name + "n"}, "tags[mlflow.runName]"),
        ({"mlflow.user": user + "u"}, "tags[mlflow.user]"),
    ]:
        refused(
            lambda tags=tags: tracking_stub.StartRun(
                pb.StartRunRequest(experiment_id=experiment_id, tags=tags)
            ),
            field,
        )
    assert not tracking_stub.SearchRuns(pb.SearchRunsRequest(experiment_ids=[experiment_id])).runs
    run = tracking_stub.StartRun(
        pb.StartRunRequest(
            experiment_id=experiment_id, tags={"mlflow.runName": name, "mlflow.user": user}
        )
    ).run
    assert (run.info.run_name, run.data.tags["mlflow.user"]) == (name, user)


def test_a_logged_model_type_fits_its_column(tracking_stub, unique):
    experiment_id = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"model-type-{unique}")
    ).experiment.experiment_id
    at_limit = "t" * limits.MAX_MODEL_TYPE_LENGTH
    for model_type in (at_limit + "t", "a\x00b"):
        refused(
            lambda model_type=model_type: tracking_stub.CreateLoggedModel(
                pb.CreateLoggedModelRequest(experiment_id=experiment_id, model_type=model_type)
            ),
            "model_type",
        )
    model = tracking_stub.CreateLoggedModel(
        pb.CreateLoggedModelRequest(experiment_id=experiment_id, model_type=at_limit)
    ).model
    assert model.model_type == at_limit


def test_registry_tags_take_what_mlflow_holds_on_any_database(registry_stub, run_id, unique):
    # A registered model's tag is a column of 5000 (PostgreSQL refuses more, SQLite takes
    # any), a version's a text of MLflow's 100,000.
    model_tag = "m" * limits.MAX_REGISTERED_MODEL_TAG_VALUE_LENGTH
    version_tag = "v" * limits.MAX_MODEL_VERSION_TAG_VALUE_LENGTH
    name = f"limits-{unique}"
    registry_stub.CreateRegisteredModel(
        reg_pb.CreateRegisteredModelRequest(name=name, tags={"long": model_tag})
    )
    version = registry_stub.CreateModelVersion(
        reg_pb.CreateModelVersionRequest(
            name=name, source=f"runs:/{run_id}/model", tags={"long": version_tag}
        )
    ).model_version.version
    registry_stub.SetRegisteredModelTag(
        reg_pb.SetRegisteredModelTagRequest(name=name, key="set", value=model_tag)
    )
    registry_stub.SetModelVersionTag(
        reg_pb.SetModelVersionTagRequest(name=name, version=version, key="set", value=version_tag)
    )
    model = registry_stub.GetRegisteredModel(
        reg_pb.GetRegisteredModelRequest(name=name)
    ).registered_model
    held = registry_stub.GetModelVersion(
        reg_pb.GetModelVersionRequest(name=name, version=version)
    ).model_version
    assert model.tags["long"] == model.tags["set"] == model_tag
    assert held.tags["long"] == held.tags["set"] == version_tag

    refused(
        lambda: registry_stub.CreateRegisteredModel(
            reg_pb.CreateRegisteredModelRequest(name=f"{name}-past", tags={"long": model_tag + "m"})
        ),
        "tags[long]",
    )
    refused(
        lambda: registry_stub.CreateModelVersion(
            reg_pb.CreateModelVersionRequest(
                name=name, source=f"runs:/{run_id}/model", tags={"long": version_tag + "v"}
            )
        ),
        "tags[long]",
    )
    refused(
        lambda: registry_stub.SetRegisteredModelTag(
            reg_pb.SetRegisteredModelTagRequest(name=name, key="past", value=model_tag + "m")
        ),
        "value",
    )
    refused(
        lambda: registry_stub.SetModelVersionTag(
            reg_pb.SetModelVersionTagRequest(
                name=name, version=version, key="past", value=version_tag + "v"
            )
        ),
        "value",
    )
    versions = registry_stub.SearchModelVersions(
        reg_pb.SearchModelVersionsRequest(filter=f"name = '{name}'")
    ).model_versions
    assert [v.version for v in versions] == [version]
    model = registry_stub.GetRegisteredModel(
        reg_pb.GetRegisteredModelRequest(name=name)
    ).registered_model
    assert "past" not in model.tags


SEARCHES = {
    "SearchExperiments": lambda stubs, order_by, **kw: stubs[0].SearchExperiments(
        pb.SearchExperimentsRequest(order_by=order_by), **kw
    ),
    "SearchRuns": lambda stubs, order_by, **kw: stubs[0].SearchRuns(
        pb.SearchRunsRequest(experiment_ids=["0"], order_by=order_by), **kw
    ),
    "SearchRegisteredModels": lambda stubs, order_by, **kw: stubs[1].SearchRegisteredModels(
        reg_pb.SearchRegisteredModelsRequest(order_by=order_by), **kw
    ),
    "SearchModelVersions": lambda stubs, order_by, **kw: stubs[1].SearchModelVersions(
        reg_pb.SearchModelVersionsRequest(order_by=order_by), **kw
    ),
}


@pytest.mark.parametrize("rpc", sorted(SEARCHES))
def test_a_search_orders_by_at_most_the_limit_of_terms(rpc, tracking_stub, registry_stub):
    # Past the limit MLflow's database fails with a server error, which the sidecar would
    # retry and report as an outage seconds later.
    stubs = (tracking_stub, registry_stub)
    search = SEARCHES[rpc]
    terms = [f"metrics.`m{index}` DESC" for index in range(limits.MAX_ORDER_BY_TERMS + 1)]
    message = refused(lambda: search(stubs, terms), "order_by")
    assert str(limits.MAX_ORDER_BY_TERMS) in message
    refused(lambda: search(stubs, ["x" * (limits.MAX_ORDER_BY_LENGTH + 1)]), "order_by[0]")


REPEATED_FIELDS = {
    "SearchRuns": ["metrics.`loss`", "metric.loss DESC"],
    "SearchRegisteredModels": ["timestamp", "last_updated_timestamp DESC"],
    "SearchModelVersions": ["version_number DESC", "version_number"],
}


@pytest.mark.parametrize("rpc", sorted(REPEATED_FIELDS))
def test_a_search_sorting_twice_by_one_field_names_the_term(rpc, tracking_stub, registry_stub):
    # MLflow refuses it with a server error, which would read as an outage after retries.
    terms = REPEATED_FIELDS[rpc]
    message = refused(
        lambda: SEARCHES[rpc]((tracking_stub, registry_stub), terms, timeout=10), "order_by[1]"
    )
    assert "order_by[0]" in message


def test_a_search_takes_the_limit_of_terms(tracking_stub):
    terms = [f"metrics.`m{index}` DESC" for index in range(limits.MAX_ORDER_BY_TERMS)]
    SEARCHES["SearchRuns"]((tracking_stub, None), terms)


def joined(count: int, term: str) -> str:
    return " and ".join(term.format(index) for index in range(count))


def test_a_search_of_runs_joins_at_most_the_limit_of_tables(tracking_stub):
    # Past it MLflow's SQLite store answers 503, which would be retried and reported as
    # an outage; the limit holds on every database, so a search works on all of them.
    def search(filter_string: str, order_by: list[str] | None = None) -> object:
        return tracking_stub.SearchRuns(
            pb.SearchRunsRequest(
                experiment_ids=["0"], filter=filter_string, order_by=order_by or []
            ),
            timeout=30,
        )

    metrics = "metrics.`m{}` > 0"
    search(joined(limits.MAX_SEARCH_JOINS, metrics))
    message = refused(lambda: search(joined(limits.MAX_SEARCH_JOINS + 1, metrics)), "filter")
    assert f"at most {limits.MAX_SEARCH_JOINS}" in message
    half = limits.MAX_ORDER_BY_TERMS
    params = [f"params.`p{index}`" for index in range(half)]
    search(joined(limits.MAX_SEARCH_JOINS - half, metrics), params)
    refused(lambda: search(joined(limits.MAX_SEARCH_JOINS - half + 1, metrics), params), "order_by")
    # Attributes join nothing; a dataset term joins two tables.
    search(joined(limits.MAX_SEARCH_JOINS + 10, "attributes.status = 'RUNNING'"))
    datasets = "datasets.name = 'd{}'"
    refused(lambda: search(joined(limits.MAX_SEARCH_JOINS // 2 + 1, datasets)), "filter")


def test_searches_of_experiments_and_logged_models_join_at_most_the_limit_of_tables(
    tracking_stub,
):
    tags = joined(limits.MAX_SEARCH_JOINS, "tags.`t{}` = 'x'")
    tracking_stub.SearchExperiments(pb.SearchExperimentsRequest(filter=tags), timeout=30)
    refused(
        lambda: tracking_stub.SearchExperiments(
            pb.SearchExperimentsRequest(filter=f"{tags} and tags.`last` = 'x'"), timeout=30
        ),
        "filter",
    )
    metrics = joined(limits.MAX_SEARCH_JOINS, "metrics.m{} > 0")

    def logged(filter_string: str, *order: str) -> object:
        return tracking_stub.SearchLoggedModels(
            pb.SearchLoggedModelsRequest(
                experiment_ids=["0"],
                filter=filter_string,
                order_by=[pb.LoggedModelOrder(field_name=field) for field in order],
            ),
            timeout=30,
        )

    logged(metrics)
    refused(lambda: logged(metrics, "metrics.o"), "order_by")
    refused(lambda: logged(f"{metrics} and metrics.last > 0"), "filter")


def test_a_logged_model_search_bounds_its_filter_and_order(tracking_stub):
    def search(filter_string: str = "", terms: int = 1, field_name: str = "name"):
        return tracking_stub.SearchLoggedModels(
            pb.SearchLoggedModelsRequest(
                experiment_ids=["0"],
                filter=filter_string,
                order_by=[pb.LoggedModelOrder(field_name=field_name)] * terms,
            )
        )

    refused(lambda: search("x" * (limits.MAX_FILTER_LENGTH + 1)), "filter")
    refused(lambda: search(terms=limits.MAX_ORDER_BY_TERMS + 1), "order_by")
    refused(
        lambda: search(field_name="x" * (limits.MAX_ORDER_BY_LENGTH + 1)),
        "order_by[0].field_name",
    )


@pytest.mark.parametrize("name", ["a/b", "a:b", ".", "..", "..a", " "])
def test_an_upload_under_a_name_mlflow_refuses_makes_no_run(
    registry_stub, tracking_stub, unique, name
):
    # The name is checked before the run the upload would log its files to is made.
    experiment = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"limits-upload-{unique}")
    ).experiment.experiment_id
    requests = model_requests(name, "", {"MLmodel": b"flavors: {}\n"})
    requests[0].header.experiment_id = experiment
    refused(lambda: registry_stub.UploadModel(iter(requests), timeout=60), "header.name")
    runs = tracking_stub.SearchRuns(
        pb.SearchRunsRequest(experiment_ids=[experiment], view_type=pb.VIEW_TYPE_ALL)
    ).runs
    assert list(runs) == []


@pytest.mark.parametrize("name", [".", "..", "..a", "  "])
def test_a_model_name_a_path_would_misread_is_refused_naming_it(registry_stub, unique, name):
    model = f"misread-{unique}"
    registry_stub.CreateRegisteredModel(reg_pb.CreateRegisteredModelRequest(name=model))
    refused(
        lambda: registry_stub.CreateRegisteredModel(reg_pb.CreateRegisteredModelRequest(name=name)),
        "name",
    )
    refused(
        lambda: registry_stub.RenameRegisteredModel(
            reg_pb.RenameRegisteredModelRequest(name=model, new_name=name)
        ),
        "new_name",
    )


def test_created_names_locations_and_sources_fit_mlflows_columns(
    tracking_stub, registry_stub, run_id, unique
):
    # At the column's width MLflow holds them on any database; past it PostgreSQL and
    # MySQL would refuse with an opaque error, so the sidecar refuses first, naming them.
    width = limits.MAX_CREATED_NAME_LENGTH
    experiment_name = f"e-{unique}-".ljust(width, "e")
    created = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=experiment_name)
    ).experiment
    assert created.name == experiment_name
    refused(
        lambda: tracking_stub.CreateExperiment(
            pb.CreateExperimentRequest(name=experiment_name + "e")
        ),
        "name",
    )
    model_name = f"m-{unique}-".ljust(width, "m")
    registry_stub.CreateRegisteredModel(reg_pb.CreateRegisteredModelRequest(name=model_name))
    refused(
        lambda: registry_stub.CreateRegisteredModel(
            reg_pb.CreateRegisteredModelRequest(name=model_name + "m")
        ),
        "name",
    )
    refused(
        lambda: registry_stub.RenameRegisteredModel(
            reg_pb.RenameRegisteredModelRequest(name=model_name, new_name=model_name + "m")
        ),
        "new_name",
    )
    source = f"runs:/{run_id}/".ljust(limits.MAX_SOURCE_LENGTH, "p")
    version = registry_stub.CreateModelVersion(
        reg_pb.CreateModelVersionRequest(name=model_name, source=source)
    ).model_version
    assert version.source == source
    refused(
        lambda: registry_stub.CreateModelVersion(
            reg_pb.CreateModelVersionRequest(name=model_name, source=source + "p")
        ),
        "source",
    )
    refused(
        lambda: tracking_stub.CreateExperiment(
            pb.CreateExperimentRequest(
                name=f"loc-{unique}",
                artifact_location="mlflow-artifacts:/" + "a" * limits.MAX_ARTIFACT_LOCATION_LENGTH,
            )
        ),
        "artifact_location",
    )


def test_a_new_experiments_location_leaves_room_for_its_runs_artifact_uris(tracking_stub, unique):
    # MLflow makes each run's artifact URI of its experiment's location, in a narrower
    # column: at the limit a run still starts there on PostgreSQL and MySQL, where a longer
    # URI fails the run's create with an opaque BAD_REQUEST.
    location = f"mlflow-artifacts:/loc-{unique}-".ljust(limits.MAX_ARTIFACT_LOCATION_LENGTH, "a")
    experiment_id = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"room-{unique}", artifact_location=location)
    ).experiment.experiment_id
    run = tracking_stub.StartRun(pb.StartRunRequest(experiment_id=experiment_id)).run
    assert run.info.artifact_uri == f"{location}/{run.info.run_id}/artifacts"
    assert len(run.info.artifact_uri) <= SqlRun.artifact_uri.type.length


def test_an_answer_over_the_message_limit_says_so_and_is_logged_as_refused(
    mlflow_server, tmp_path, caplog
):
    # Params within every limit add up to a run whose GetRun answer no message can hold:
    # the sidecar says why, instead of grpc's bare RESOURCE_EXHAUSTED after an OK log line.
    limit = 64 * 1024
    running = RunningSidecar(
        sidecar_config(tmp_path, mlflow_server.url, server={"max_message_bytes": limit})
    )
    try:
        with (
            caplog.at_level(logging.INFO, logger="mlflow_sidecar.access"),
            grpc.insecure_channel(running.target) as channel,
        ):
            stub = tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)
            experiment_id = stub.CreateExperiment(
                pb.CreateExperimentRequest(name=f"answer-{tmp_path.name}")
            ).experiment.experiment_id
            run_id = stub.StartRun(pb.StartRunRequest(experiment_id=experiment_id)).run.info.run_id
            value = "v" * limits.MAX_PARAM_VALUE_LENGTH
            for part in range(2):
                params = {f"p{part}-{i}": value for i in range(6)}
                stub.LogParams(pb.LogParamsRequest(run_id=run_id, params=params))
            with pytest.raises(grpc.RpcError) as err:
                stub.GetRun(pb.GetRunRequest(run_id=run_id))
            # A call that changed the run answers OK with the run's info alone: an error
            # would say nothing happened, and its retry would meet the same answer.
            end = pb.EndRunRequest(
                run_id=run_id, status=pb.RUN_STATUS_KILLED, request_id=f"end-{tmp_path.name}"
            )
            ended = [stub.EndRun(end).run for _ in range(2)]
            resumed = stub.ResumeRun(pb.ResumeRunRequest(run_id=run_id)).run
            stub.DeleteRun(pb.DeleteRunRequest(run_id=run_id))
            restored = stub.RestoreRun(pb.RestoreRunRequest(run_id=run_id)).run
    finally:
        running.stop()
    assert [r.info.status for r in ended] == [pb.RUN_STATUS_KILLED] * 2
    assert resumed.info.status == pb.RUN_STATUS_RUNNING
    assert restored.info.lifecycle_stage == pb.LIFECYCLE_STAGE_ACTIVE
    for run in (*ended, resumed, restored):
        assert run.info.run_id == run_id and not run.HasField("data")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = error_from_rpc(err.value)
    assert error.reason == ErrorReason.ANSWER_TOO_LARGE
    assert int(error.metadata["answer_bytes"]) > limit
    assert error.metadata["max_message_bytes"] == str(limit)
    assert "server.max_message_bytes" in error.message
    logged = [r.getMessage() for r in caplog.records if r.name == "mlflow_sidecar.access"]
    get_run = [m for m in logged if "/GetRun " in m]
    assert len(get_run) == 1 and "RESOURCE_EXHAUSTED" in get_run[0], logged


def test_a_change_that_took_effect_answers_without_its_bulk_when_too_large(
    mlflow_server, tmp_path, unique
):
    # Each call below has changed MLflow by the time its answer is built; an answer over
    # the limit comes without its entity's tags (or params, data...), never as an error
    # that says nothing happened.
    limit = 64 * 1024
    running = RunningSidecar(
        sidecar_config(tmp_path, mlflow_server.url, server={"max_message_bytes": limit})
    )
    try:
        with grpc.insecure_channel(running.target) as channel:
            tracking = tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)
            registry = registry_pb2_grpc.ModelRegistryServiceStub(channel)
            experiment_id = tracking.CreateExperiment(
                pb.CreateExperimentRequest(name=f"bulk-{unique}")
            ).experiment.experiment_id
            # A request just under the limit: its answer adds the run's info to its tags.
            start = pb.StartRunRequest(experiment_id=experiment_id, request_id=f"start-{unique}")
            value = "t" * limits.MAX_TAG_VALUE_LENGTH
            while start.ByteSize() + 8100 < limit - 16:
                start.tags[f"t{len(start.tags)}"] = value
            start.tags["last"] = "t" * (limit - 16 - start.ByteSize() - 12)
            assert limit - 40 <= start.ByteSize() <= limit
            started = [tracking.StartRun(start).run for _ in range(2)]

            name = f"bulk-{unique}"
            registry.CreateRegisteredModel(reg_pb.CreateRegisteredModelRequest(name=name))
            model_value = "m" * limits.MAX_REGISTERED_MODEL_TAG_VALUE_LENGTH
            for i in range(14):
                registry.SetRegisteredModelTag(
                    reg_pb.SetRegisteredModelTagRequest(name=name, key=f"k{i}", value=model_value)
                )
            updated = registry.UpdateRegisteredModel(
                reg_pb.UpdateRegisteredModelRequest(name=name, description="new")
            ).registered_model
            renamed = registry.RenameRegisteredModel(
                reg_pb.RenameRegisteredModelRequest(name=name, new_name=f"{name}-2")
            ).registered_model
            version = registry.CreateModelVersion(
                reg_pb.CreateModelVersionRequest(
                    name=f"{name}-2", source=f"runs:/{started[0].info.run_id}/model"
                )
            ).model_version
            for i in range(2):
                registry.SetModelVersionTag(
                    reg_pb.SetModelVersionTagRequest(
                        name=f"{name}-2",
                        version=version.version,
                        key=f"k{i}",
                        value="v" * 40_000,
                    )
                )
            described = registry.UpdateModelVersion(
                reg_pb.UpdateModelVersionRequest(
                    name=f"{name}-2", version=version.version, description="described"
                )
            ).model_version
    finally:
        running.stop()
    assert started[0].info.run_id == started[1].info.run_id
    assert not started[0].HasField("data")
    assert started[0].info.status == pb.RUN_STATUS_RUNNING
    assert updated.name == name and updated.description == "new" and not updated.tags
    assert renamed.name == f"{name}-2" and not renamed.tags
    assert described.description == "described" and not described.tags
    assert described.version == version.version
    # MLflow holds each change whole: one run, with its tags.
    direct = MlflowClient(mlflow_server.url, mlflow_server.url)
    (run,) = direct.search_runs([experiment_id])
    assert run.info.run_id == started[0].info.run_id and run.data.tags["last"]
    kept = direct.get_registered_model(f"{name}-2").tags
    assert {k for k in kept if not k.startswith("mlflow_sidecar.")} == {f"k{i}" for i in range(14)}
