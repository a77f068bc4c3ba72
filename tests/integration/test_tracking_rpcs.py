"""Every tracking RPC against a real mlflow server, through the raw generated stubs."""

from __future__ import annotations

import math
import sys

import grpc
import pytest

from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import tracking_pb2 as pb


def _experiment(stub, name: str) -> str:
    reply = stub.CreateExperiment(pb.CreateExperimentRequest(name=name, tags={"team": "rl"}))
    return reply.experiment.experiment_id


def _run(stub, experiment_id: str, **kwargs) -> pb.Run:
    return stub.StartRun(pb.StartRunRequest(experiment_id=experiment_id, **kwargs)).run


def test_create_and_get_experiment_by_id_and_name(tracking_stub, unique):
    created = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"exp-{unique}", tags={"team": "rl"})
    ).experiment
    assert created.experiment_id and created.name == f"exp-{unique}"
    assert created.tags["team"] == "rl"
    assert created.lifecycle_stage == pb.LIFECYCLE_STAGE_ACTIVE
    by_id = tracking_stub.GetExperiment(
        pb.GetExperimentRequest(experiment_id=created.experiment_id)
    )
    by_name = tracking_stub.GetExperiment(pb.GetExperimentRequest(name=f"exp-{unique}"))
    assert by_id.experiment == by_name.experiment == created


def test_create_experiment_get_if_exists_returns_the_same(tracking_stub, unique):
    first = tracking_stub.CreateExperiment(pb.CreateExperimentRequest(name=f"dup-{unique}"))
    again = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"dup-{unique}", get_if_exists=True)
    )
    assert again.experiment.experiment_id == first.experiment.experiment_id
    with pytest.raises(grpc.RpcError) as err:
        tracking_stub.CreateExperiment(pb.CreateExperimentRequest(name=f"dup-{unique}"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_search_experiments_paginates(tracking_stub, unique):
    names = {f"page-{unique}-{i}" for i in range(5)}
    for name in names:
        _experiment(tracking_stub, name)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = tracking_stub.SearchExperiments(
            pb.SearchExperimentsRequest(
                filter=f"name LIKE 'page-{unique}-%'", page_size=2, page_token=token
            )
        )
        seen += [e.name for e in reply.experiments]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert set(seen) == names and len(seen) == 5
    assert pages == 3


def test_start_get_end_run_with_parent_and_tags(tracking_stub, unique):
    exp = _experiment(tracking_stub, f"runs-{unique}")
    parent = _run(tracking_stub, exp, run_name="parent")
    child = _run(
        tracking_stub,
        exp,
        run_name="child",
        tags={"algo": "ppo"},
        parent_run_id=parent.info.run_id,
        start_time_ms=1_700_000_000_000,
    )
    assert child.info.run_name == "child"
    assert child.info.status == pb.RUN_STATUS_RUNNING
    assert child.info.start_time_ms == 1_700_000_000_000
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["algo"] == "ppo"
    ended = tracking_stub.EndRun(
        pb.EndRunRequest(run_id=child.info.run_id, status=pb.RUN_STATUS_FAILED)
    ).run
    assert ended.info.status == pb.RUN_STATUS_FAILED
    assert ended.info.end_time_ms >= ended.info.start_time_ms
    fetched = tracking_stub.GetRun(pb.GetRunRequest(run_id=child.info.run_id)).run
    assert fetched.info.status == pb.RUN_STATUS_FAILED


def test_log_params_is_write_once(tracking_stub, unique):
    run = _run(tracking_stub, _experiment(tracking_stub, f"params-{unique}"))
    run_id = run.info.run_id
    tracking_stub.LogParams(
        pb.LogParamsRequest(run_id=run_id, params={"lr": "0.001", "gamma": "0.99"})
    )
    tracking_stub.LogParams(pb.LogParamsRequest(run_id=run_id, params={"lr": "0.001"}))
    with pytest.raises(grpc.RpcError) as err:
        tracking_stub.LogParams(pb.LogParamsRequest(run_id=run_id, params={"lr": "0.1"}))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    refusal = error_from_rpc(err.value)
    assert (refusal.reason, refusal.metadata) == (ErrorReason.PARAM_VALUE_CHANGED, {"key": "lr"})
    params = tracking_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run.data.params
    assert dict(params) == {"lr": "0.001", "gamma": "0.99"}


def test_log_params_over_mlflow_batch_limit(tracking_stub, unique):
    run_id = _run(tracking_stub, _experiment(tracking_stub, f"manyparams-{unique}")).info.run_id
    params = {f"p{i}": str(i) for i in range(250)}
    tracking_stub.LogParams(pb.LogParamsRequest(run_id=run_id, params=params))
    assert dict(tracking_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run.data.params) == params


def test_log_metrics_splits_batches_and_history_paginates(tracking_stub, unique):
    run_id = _run(tracking_stub, _experiment(tracking_stub, f"metrics-{unique}")).info.run_id
    points = [
        pb.Metric(key="reward", value=float(i), timestamp_ms=1_700_000_000_000 + i, step=i)
        for i in range(2500)
    ]
    reply = tracking_stub.LogMetrics(pb.LogMetricsRequest(run_id=run_id, metrics=points))
    assert reply.accepted_points == 2500
    history: list[pb.Metric] = []
    token = ""
    while True:
        page = tracking_stub.GetMetricHistory(
            pb.GetMetricHistoryRequest(
                run_id=run_id, metric_key="reward", page_size=1000, page_token=token
            )
        )
        history += page.metrics
        token = page.next_page_token
        if not token:
            break
    assert [m.step for m in history] == list(range(2500))
    assert [m.value for m in history] == [float(i) for i in range(2500)]
    latest = tracking_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run.data.metrics
    assert [(m.key, m.value, m.step) for m in latest] == [("reward", 2499.0, 2499)]


def test_log_metrics_keeps_nan_and_infinity(tracking_stub, unique):
    run_id = _run(tracking_stub, _experiment(tracking_stub, f"nan-{unique}")).info.run_id
    tracking_stub.LogMetrics(
        pb.LogMetricsRequest(
            run_id=run_id,
            metrics=[
                pb.Metric(key="loss", value=math.nan, step=0),
                pb.Metric(key="loss", value=math.inf, step=1),
            ],
        )
    )
    history = tracking_stub.GetMetricHistory(
        pb.GetMetricHistoryRequest(run_id=run_id, metric_key="loss")
    ).metrics
    assert len(history) == 2
    by_step = {m.step: m.value for m in history}
    # MLflow's SQL store keeps NaN and stores +inf as the largest finite double.
    assert math.isnan(by_step[0])
    assert by_step[1] == sys.float_info.max
    assert all(m.timestamp_ms > 0 for m in history)


def test_set_and_delete_run_tags(tracking_stub, unique):
    run_id = _run(tracking_stub, _experiment(tracking_stub, f"tags-{unique}")).info.run_id
    tracking_stub.SetRunTags(pb.SetRunTagsRequest(run_id=run_id, tags={"a": "1", "b": "2"}))
    tracking_stub.SetRunTags(pb.SetRunTagsRequest(run_id=run_id, tags={"a": "3"}))
    tracking_stub.DeleteRunTag(pb.DeleteRunTagRequest(run_id=run_id, key="b"))
    tags = tracking_stub.GetRun(pb.GetRunRequest(run_id=run_id)).run.data.tags
    assert tags["a"] == "3" and "b" not in tags


def test_search_runs_filters_and_paginates(tracking_stub, unique):
    exp = _experiment(tracking_stub, f"search-{unique}")
    ids = []
    for i in range(5):
        run_id = _run(tracking_stub, exp, run_name=f"r{i}").info.run_id
        tracking_stub.LogParams(pb.LogParamsRequest(run_id=run_id, params={"seed": str(i)}))
        ids.append(run_id)
    reply = tracking_stub.SearchRuns(
        pb.SearchRunsRequest(experiment_ids=[exp], filter="params.seed = '3'")
    )
    assert [r.info.run_id for r in reply.runs] == [ids[3]]
    seen: list[str] = []
    token = ""
    while True:
        page = tracking_stub.SearchRuns(
            pb.SearchRunsRequest(
                experiment_ids=[exp],
                order_by=["attributes.run_name ASC"],
                page_size=2,
                page_token=token,
            )
        )
        seen += [r.info.run_name for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"r{i}" for i in range(5)]
