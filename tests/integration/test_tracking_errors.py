"""Each status code of the error mapping, produced by a real sidecar and a real MLflow."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import mlflow
import pytest

from mlflow_sidecar.core.errors import ErrorReason, SidecarError, error_from_rpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.processes import free_port


def _code(call, request, **kwargs) -> tuple[grpc.StatusCode, SidecarError]:
    """The status code of a failed call and the domain error its details describe."""
    with pytest.raises(grpc.RpcError) as err:
        call(request, **kwargs)
    return err.value.code(), error_from_rpc(err.value)


def _new_run(stub, name: str) -> str:
    exp = stub.CreateExperiment(pb.CreateExperimentRequest(name=name)).experiment.experiment_id
    return stub.StartRun(pb.StartRunRequest(experiment_id=exp)).run.info.run_id


def test_not_found(tracking_stub):
    code, error = _code(tracking_stub.GetRun, pb.GetRunRequest(run_id="0" * 32))
    assert code == grpc.StatusCode.NOT_FOUND
    assert error.reason == ErrorReason.RUN_NOT_FOUND
    assert error.metadata["mlflow_error_code"] == "RESOURCE_DOES_NOT_EXIST"
    code, error = _code(tracking_stub.GetExperiment, pb.GetExperimentRequest(name="no-such-exp"))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-exp" in error.message
    assert error.reason == ErrorReason.EXPERIMENT_NOT_FOUND
    code, error = _code(
        tracking_stub.StartRun, pb.StartRunRequest(experiment_id="987654321", run_name="x")
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert error.reason == ErrorReason.EXPERIMENT_NOT_FOUND


def test_the_history_of_an_unknown_run_is_not_found_and_of_a_known_one_empty(tracking_stub, unique):
    # MLflow answers both with an empty history: a mistyped run id is not "no points yet".
    code, error = _code(
        tracking_stub.GetMetricHistory,
        pb.GetMetricHistoryRequest(run_id="0" * 32, metric_key="loss"),
    )
    assert (code, error.reason) == (grpc.StatusCode.NOT_FOUND, ErrorReason.RUN_NOT_FOUND)
    run_id = _new_run(tracking_stub, f"history-{unique}")
    history = tracking_stub.GetMetricHistory(
        pb.GetMetricHistoryRequest(run_id=run_id, metric_key="loss")
    )
    assert list(history.metrics) == []


def test_already_exists(tracking_stub, unique):
    tracking_stub.CreateExperiment(pb.CreateExperimentRequest(name=f"exists-{unique}"))
    code, _ = _code(
        tracking_stub.CreateExperiment, pb.CreateExperimentRequest(name=f"exists-{unique}")
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("method", "request_factory", "field"),
    [
        ("CreateExperiment", lambda run_id: pb.CreateExperimentRequest(name=""), "name"),
        ("GetExperiment", lambda run_id: pb.GetExperimentRequest(), "selector"),
        (
            "SearchExperiments",
            lambda run_id: pb.SearchExperimentsRequest(page_size=5000),
            "page_size",
        ),
        ("SearchRuns", lambda run_id: pb.SearchRunsRequest(), "experiment_ids"),
        (
            "LogMetrics",
            lambda run_id: pb.LogMetricsRequest(
                run_id=run_id, metrics=[pb.Metric(key="", value=1)]
            ),
            "metrics[0].key",
        ),
        (
            "LogMetrics",
            lambda run_id: pb.LogMetricsRequest(
                run_id=run_id, metrics=[pb.Metric(key="ok", value=1, timestamp_ms=-5)]
            ),
            "metrics[0].timestamp_ms",
        ),
        (
            "LogParams",
            lambda run_id: pb.LogParamsRequest(run_id=run_id, params={"../up": "x"}),
            "params.key",
        ),
        (
            "LogParams",
            lambda run_id: pb.LogParamsRequest(run_id=run_id, params={"big": "x" * 6001}),
            "params[big]",
        ),
        (
            "EndRun",
            lambda run_id: pb.EndRunRequest(run_id=run_id, status=pb.RUN_STATUS_RUNNING),
            "status",
        ),
        (
            "StartRun",
            lambda run_id: pb.StartRunRequest(experiment_id="0", client_request_id="a b'c"),
            "client_request_id",
        ),
        ("GetRun", lambda run_id: pb.GetRunRequest(run_id=""), "run_id"),
        # MLflow reads ids as numbers: these would name experiment 0, the Default one.
        (
            "DeleteExperiment",
            lambda run_id: pb.DeleteExperimentRequest(experiment_id="0" * 32),
            "experiment_id",
        ),
        (
            "GetExperiment",
            lambda run_id: pb.GetExperimentRequest(experiment_id=" 0"),
            "experiment_id",
        ),
        (
            "SearchRuns",
            lambda run_id: pb.SearchRunsRequest(experiment_ids=["0", "+0"]),
            "experiment_ids[1]",
        ),
        ("StartRun", lambda run_id: pb.StartRunRequest(experiment_id="00"), "experiment_id"),
        (
            "StartRun",
            lambda run_id: pb.StartRunRequest(experiment_id="0", parent_run_id="../x"),
            "parent_run_id",
        ),
        # Past int64 MLflow's store fails with a server error, which reads as an outage.
        (
            "GetExperiment",
            lambda run_id: pb.GetExperimentRequest(experiment_id=str(2**63)),
            "experiment_id",
        ),
        (
            "SearchRuns",
            lambda run_id: pb.SearchRunsRequest(experiment_ids=["0", str(-(2**63) - 1)]),
            "experiment_ids[1]",
        ),
        (
            "SearchRuns",
            lambda run_id: pb.SearchRunsRequest(experiment_ids=["0"], view_type=99),
            "view_type",
        ),
        ("FlushMetrics", lambda run_id: pb.FlushMetricsRequest(run_id="../x"), "run_id"),
        (
            "FlushMetrics",
            lambda run_id: pb.FlushMetricsRequest(run_id=run_id, max_wait_s=-1),
            "max_wait_s",
        ),
        (
            "GetMetricHistory",
            lambda run_id: pb.GetMetricHistoryRequest(run_id=run_id, metric_key="m", page_size=-1),
            "page_size",
        ),
    ],
)
def test_invalid_argument_names_the_field(tracking_stub, unique, method, request_factory, field):
    run_id = _new_run(tracking_stub, f"invalid-{method}-{field}-{unique}")
    code, error = _code(getattr(tracking_stub, method), request_factory(run_id))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == field, error.message


def test_failed_precondition_for_changed_param_and_deleted_run(
    tracking_stub, mlflow_server, unique
):
    run_id = _new_run(tracking_stub, f"precondition-{unique}")
    tracking_stub.LogParams(pb.LogParamsRequest(run_id=run_id, params={"lr": "1"}))
    code, error = _code(
        tracking_stub.LogParams, pb.LogParamsRequest(run_id=run_id, params={"lr": "2"})
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == ErrorReason.PARAM_VALUE_CHANGED

    mlflow.MlflowClient(tracking_uri=mlflow_server.url).delete_run(run_id)
    for call, request in [
        (tracking_stub.LogParams, pb.LogParamsRequest(run_id=run_id, params={"new": "1"})),
        (tracking_stub.EndRun, pb.EndRunRequest(run_id=run_id)),
        (
            tracking_stub.LogMetrics,
            pb.LogMetricsRequest(run_id=run_id, metrics=[pb.Metric(key="m", value=1)]),
        ),
    ]:
        code, error = _code(call, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (call, error.message)
        assert error.reason == ErrorReason.RUN_NOT_ACTIVE, (call, error.message)


RESERVED_TAG_CALLS = {
    "StartRun": lambda stub, experiment_id, model_id, key: stub.StartRun(
        pb.StartRunRequest(experiment_id=experiment_id, tags={key: "x"})
    ),
    "CreateLoggedModel": lambda stub, experiment_id, model_id, key: stub.CreateLoggedModel(
        pb.CreateLoggedModelRequest(experiment_id=experiment_id, name="other", tags={key: "x"})
    ),
    "SetLoggedModelTags": lambda stub, experiment_id, model_id, key: stub.SetLoggedModelTags(
        pb.SetLoggedModelTagsRequest(model_id=model_id, tags={key: "x"})
    ),
    "DeleteLoggedModelTag": lambda stub, experiment_id, model_id, key: stub.DeleteLoggedModelTag(
        pb.DeleteLoggedModelTagRequest(model_id=model_id, key=key)
    ),
}


@pytest.mark.parametrize("method", sorted(RESERVED_TAG_CALLS))
def test_the_sidecars_own_tags_are_not_the_callers_to_set_on_runs_or_logged_models(
    tracking_stub, unique, method
):
    # The registry's tag paths: test_registry_errors.py.
    experiment_id = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"reserved-{method}-{unique}")
    ).experiment.experiment_id
    model_id = tracking_stub.CreateLoggedModel(
        pb.CreateLoggedModelRequest(experiment_id=experiment_id, name="net")
    ).model.model_id
    key = "mlflow_sidecar.request_id"
    code, error = _code(
        lambda _: RESERVED_TAG_CALLS[method](tracking_stub, experiment_id, model_id, key),
        None,
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, error.message
    assert "the sidecar's own" in error.message
    runs = tracking_stub.SearchRuns(pb.SearchRunsRequest(experiment_ids=[experiment_id])).runs
    assert list(runs) == []
    models = tracking_stub.SearchLoggedModels(
        pb.SearchLoggedModelsRequest(experiment_ids=[experiment_id])
    ).models
    assert [m.model_id for m in models] == [model_id]


@pytest.fixture()
def sidecar_without_mlflow(tmp_path) -> Iterator[RunningSidecar]:
    """A sidecar whose MLflow tracking server is a closed port."""
    config = sidecar_config(
        tmp_path,
        f"http://127.0.0.1:{free_port()}",
        retry={"max_time_s": 1.5, "max_tries": 4},
        server={"max_message_bytes": 64 * 1024},
    )
    running = RunningSidecar(config)
    yield running
    running.stop()


def test_unavailable_when_mlflow_is_down(sidecar_without_mlflow):
    with grpc.insecure_channel(sidecar_without_mlflow.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        code, error = _code(stub.GetRun, pb.GetRunRequest(run_id="a" * 32), timeout=30)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == ErrorReason.MLFLOW_UNAVAILABLE


def test_deadline_exceeded_when_mlflow_is_down_past_the_deadline(tmp_path):
    config = sidecar_config(
        tmp_path, f"http://127.0.0.1:{free_port()}", retry={"max_time_s": 60, "max_tries": 100}
    )
    running = RunningSidecar(config)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            code, _ = _code(stub.GetRun, pb.GetRunRequest(run_id="a" * 32), timeout=1.0)
    finally:
        running.stop()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_resource_exhausted_for_a_message_over_the_limit(sidecar_without_mlflow):
    points = [pb.Metric(key="reward", value=float(i), step=i) for i in range(10_000)]
    with grpc.insecure_channel(sidecar_without_mlflow.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        code, _ = _code(stub.LogMetrics, pb.LogMetricsRequest(run_id="a" * 32, metrics=points))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def _search_runs(stub, **fields):
    return stub.SearchRuns(pb.SearchRunsRequest(**{"experiment_ids": ["0"], **fields}))


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda stub: _search_runs(stub, experiment_ids=["abc"]), "experiment_ids[0]"),
        (
            lambda stub: stub.SearchLoggedModels(
                pb.SearchLoggedModelsRequest(experiment_ids=["0", "abc"])
            ),
            "experiment_ids[1]",
        ),
        (
            lambda stub: stub.SearchExperiments(
                pb.SearchExperimentsRequest(filter="name = 'x'", order_by=["name", "nope"])
            ),
            "order_by[1]",
        ),
        (
            lambda stub: stub.SearchLoggedModels(
                pb.SearchLoggedModelsRequest(
                    experiment_ids=["0"],
                    order_by=[
                        pb.LoggedModelOrder(field_name="name"),
                        pb.LoggedModelOrder(field_name="no_such_column"),
                    ],
                )
            ),
            "order_by[1].field_name",
        ),
        (lambda stub: _search_runs(stub, filter="name = 'x", order_by=["start_time"]), "filter"),
        (
            lambda stub: _search_runs(
                stub, filter="attribute.order_by = 'x'", order_by=["start_time"]
            ),
            "filter",
        ),
        # MLflow's parser fails on these with errors of its own, not a refusal, and its
        # database on an integer past int64: its server answers 500, read as an outage.
        (lambda stub: _search_runs(stub, filter="attributes.run_id IN (a)"), "filter"),
        (
            lambda stub: _search_runs(stub, filter="attributes.start_time > 99999999999999999999"),
            "filter",
        ),
        (
            lambda stub: stub.StartRun(
                pb.StartRunRequest(experiment_id="0", run_name="A", tags={"mlflow.runName": "B"})
            ),
            "run_name",
        ),
        (
            lambda stub: stub.CreateLoggedModel(
                pb.CreateLoggedModelRequest(experiment_id="0", name="a/b")
            ),
            "name",
        ),
    ],
    ids=[
        "search-runs-id",
        "search-logged-models-id",
        "order-with-filter",
        "logged-model-order",
        "filter-with-order",
        "filter-key-named-order_by",
        "runs-filter-parser-error",
        "runs-filter-past-int64",
        "run-name-twice",
        "logged-model-name",
    ],
)
def test_an_invalid_argument_names_the_field_at_fault(tracking_stub, call, field):
    with pytest.raises(grpc.RpcError) as err:
        call(tracking_stub)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert error_from_rpc(err.value).field == field, err.value.details()


# Field 1, a string, holding bytes that are not UTF-8; and a header (field 1) holding one.
NOT_UTF8 = b"\x0a\x02\xff\xfe"
HEADER_NOT_UTF8 = b"\x0a\x04" + NOT_UTF8


@pytest.mark.parametrize(
    ("method", "shape", "payload"),
    [
        ("mlflow_sidecar.v1.ModelRegistryService/DownloadModel", "unary_stream", NOT_UTF8),
        ("mlflow_sidecar.v1.ModelRegistryService/WatchModelAlias", "unary_stream", NOT_UTF8),
        ("mlflow_sidecar.v1.ModelRegistryService/UploadModel", "stream_unary", HEADER_NOT_UTF8),
        (
            "mlflow_sidecar.v1.ExperimentTrackingService/UploadArtifact",
            "stream_unary",
            HEADER_NOT_UTF8,
        ),
        ("mlflow_sidecar.v1.ExperimentTrackingService/DownloadArtifact", "unary_stream", NOT_UTF8),
    ],
    ids=["DownloadModel", "WatchModelAlias", "UploadModel", "UploadArtifact", "DownloadArtifact"],
)
def test_a_streaming_request_that_does_not_decode_is_invalid_argument_with_details(
    channel, method, shape, payload
):
    with pytest.raises(grpc.RpcError) as err:
        if shape == "unary_stream":
            list(channel.unary_stream(f"/{method}")(payload, timeout=30))
        else:
            channel.stream_unary(f"/{method}")(iter([payload]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert method.rpartition("/")[2] in err.value.details()
    assert error_from_rpc(err.value).reason == ErrorReason.INVALID_ARGUMENT
    assert "x-request-id" in dict(err.value.trailing_metadata() or ())
