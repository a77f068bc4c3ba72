"""Every paginated RPC checks its page token, behind an mlflow server and on the embedded
store: a tampered, foreign or garbage token is INVALID_ARGUMENT on `page_token`, never
INTERNAL or UNAVAILABLE, and genuine tokens still page."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest

from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import registry_pb2 as rpb
from mlflow_sidecar.v1 import registry_pb2_grpc as rpb_grpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc


def _b64(value: object, *, urlsafe: bool = False) -> str:
    raw = json.dumps(value).encode()
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()


TAMPERED = [
    _b64({"offset": 1e20}),
    _b64({"offset": 10**20}),
    _b64({"offset": -1}),
    _b64({"offset": "1; DROP TABLE runs"}),
    _b64({"offset": 1}),  # MLflow's own form: not a token the sidecar handed out
    _b64({"kind": "runs", "offset": -1}, urlsafe=True),
    _b64({"kind": "runs", "offset": 1e20}, urlsafe=True),
    _b64({"kind": "runs", "offset": 10**20}, urlsafe=True),
    _b64({"kind": "metric-history", "run": "x", "key": "m", "step": 1e30, "ts": 0, "seen": 1}),
    _b64({"path": "", "after": 5}, urlsafe=True),
    "garbage",
    "not-a-token",
    "AAAA",
    "=",
]

Call = Callable[[str], object]


@pytest.fixture()
def calls(either_sidecar, unique) -> dict[str, Call]:
    """Each paginated RPC, with things to page through, as page_token -> call."""
    with grpc.insecure_channel(either_sidecar.target) as channel:
        tracking = pb_grpc.ExperimentTrackingServiceStub(channel)
        registry = rpb_grpc.ModelRegistryServiceStub(channel)
        experiment_id = tracking.CreateExperiment(
            pb.CreateExperimentRequest(name=f"tokens-{unique}")
        ).experiment.experiment_id
        run_id = tracking.StartRun(pb.StartRunRequest(experiment_id=experiment_id)).run.info.run_id
        tracking.StartRun(pb.StartRunRequest(experiment_id=experiment_id))
        tracking.LogMetrics(
            pb.LogMetricsRequest(
                run_id=run_id, metrics=[pb.Metric(key="m", value=v, step=1) for v in (1, 2)]
            )
        )
        for name in ("a.txt", "b.txt"):
            tracking.UploadArtifact(
                iter(
                    [
                        pb.UploadArtifactRequest(
                            header=pb.UploadArtifactHeader(
                                run_id=run_id,
                                artifact_path=name,
                                size_bytes=1,
                                sha256="ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb",
                            )
                        ),
                        pb.UploadArtifactRequest(chunk=b"a"),
                    ]
                )
            )
        model = f"tokens-{unique}"
        for suffix in ("", "-2"):
            registry.CreateRegisteredModel(rpb.CreateRegisteredModelRequest(name=model + suffix))
        for _ in range(2):
            registry.CreateModelVersion(
                rpb.CreateModelVersionRequest(name=model, source=f"runs:/{run_id}/model")
            )
        yield {
            "SearchExperiments": lambda token: (
                tracking.SearchExperiments(
                    pb.SearchExperimentsRequest(page_size=1, page_token=token)
                ).next_page_token
            ),
            "SearchRuns": lambda token: (
                tracking.SearchRuns(
                    pb.SearchRunsRequest(
                        experiment_ids=[experiment_id], page_size=1, page_token=token
                    )
                ).next_page_token
            ),
            "GetMetricHistory": lambda token: (
                tracking.GetMetricHistory(
                    pb.GetMetricHistoryRequest(
                        run_id=run_id, metric_key="m", page_size=1, page_token=token
                    )
                ).next_page_token
            ),
            "ListArtifacts": lambda token: (
                tracking.ListArtifacts(
                    pb.ListArtifactsRequest(run_id=run_id, page_size=1, page_token=token)
                ).next_page_token
            ),
            "SearchRegisteredModels": lambda token: (
                registry.SearchRegisteredModels(
                    rpb.SearchRegisteredModelsRequest(
                        filter=f"name LIKE 'tokens-{unique}%'", page_size=1, page_token=token
                    )
                ).next_page_token
            ),
            "SearchModelVersions": lambda token: (
                registry.SearchModelVersions(
                    rpb.SearchModelVersionsRequest(
                        filter=f"name = '{model}'", page_size=1, page_token=token
                    )
                ).next_page_token
            ),
        }


def _refused(call: Call, token: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (token, err.value.details())
    assert err.value.details().startswith("page_token: "), err.value.details()


def test_every_paginated_rpc_refuses_tampered_tokens(calls):
    for name, call in calls.items():
        for token in TAMPERED:
            try:
                _refused(call, token)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from exc


def test_genuine_tokens_page_and_a_token_of_another_rpc_is_refused(calls):
    tokens = {}
    for name, call in calls.items():
        token = call("")
        assert token, name
        assert call(token) == "" or name == "SearchExperiments", name
        tokens[name] = token
    for name, call in calls.items():
        for other, token in tokens.items():
            if other != name:
                _refused(call, token)


def test_a_metric_history_token_of_another_run_or_metric_is_refused(sidecar, unique):
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        experiment_id = stub.CreateExperiment(
            pb.CreateExperimentRequest(name=f"history-tokens-{unique}")
        ).experiment.experiment_id
        runs = [
            stub.StartRun(pb.StartRunRequest(experiment_id=experiment_id)).run.info.run_id
            for _ in range(2)
        ]
        for run_id in runs:
            stub.LogMetrics(
                pb.LogMetricsRequest(
                    run_id=run_id,
                    metrics=[pb.Metric(key=k, value=1, step=s) for k in "ab" for s in (1, 2)],
                )
            )

        def history(run_id: str, key: str, token: str = "") -> str:
            return stub.GetMetricHistory(
                pb.GetMetricHistoryRequest(
                    run_id=run_id, metric_key=key, page_size=1, page_token=token
                )
            ).next_page_token

        token = history(runs[0], "a")
        assert history(runs[0], "a", token) == ""
        _refused(lambda t: history(runs[0], "b", t), token)
        _refused(lambda t: history(runs[1], "a", t), token)


SHA256_OF_A = "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"

# A page of one RPC: (the request's fields, page_token) -> next_page_token.
Page = Callable[[dict[str, object], str], str]


@pytest.fixture(scope="module")
def queries(sidecar) -> Iterator[dict[str, tuple[Page, dict[str, object], dict[str, dict]]]]:
    """Each search and listing with two results for one query: its page function, that
    query's fields, and by name the fields of each other query of it."""
    unique = uuid.uuid4().hex[:10]
    with grpc.insecure_channel(sidecar.target) as channel:
        tracking = pb_grpc.ExperimentTrackingServiceStub(channel)
        registry = rpb_grpc.ModelRegistryServiceStub(channel)
        experiments = [
            tracking.CreateExperiment(
                pb.CreateExperimentRequest(name=f"queries-{unique}-{suffix}")
            ).experiment.experiment_id
            for suffix in "ab"
        ]
        runs = [
            tracking.StartRun(pb.StartRunRequest(experiment_id=experiments[0])).run.info.run_id
            for _ in range(2)
        ]
        logged = [
            tracking.CreateLoggedModel(
                pb.CreateLoggedModelRequest(experiment_id=experiments[0], name=f"net-{i}")
            ).model.model_id
            for i in range(2)
        ]
        for path in ("d/a.txt", "d/b.txt"):
            header = {"artifact_path": path, "size_bytes": 1, "sha256": SHA256_OF_A}
            tracking.UploadArtifact(
                iter(
                    [
                        pb.UploadArtifactRequest(
                            header=pb.UploadArtifactHeader(run_id=runs[0], **header)
                        ),
                        pb.UploadArtifactRequest(chunk=b"a"),
                    ]
                )
            )
            tracking.UploadLoggedModelArtifact(
                iter(
                    [
                        pb.UploadLoggedModelArtifactRequest(
                            header=pb.UploadLoggedModelArtifactHeader(model_id=logged[0], **header)
                        ),
                        pb.UploadLoggedModelArtifactRequest(chunk=b"a"),
                    ]
                )
            )
        model = f"queries-{unique}"
        for suffix in ("", "-2"):
            registry.CreateRegisteredModel(rpb.CreateRegisteredModelRequest(name=model + suffix))
        for _ in range(2):
            registry.CreateModelVersion(
                rpb.CreateModelVersionRequest(name=model, source=f"runs:/{runs[0]}/model")
            )

        def page(call: Callable[..., object], request_type: type) -> Page:
            def one(fields: dict[str, object], token: str) -> str:
                answer = call(request_type(**fields, page_size=1, page_token=token))
                return str(answer.next_page_token)  # type: ignore[attr-defined]

            return one

        yield {
            "SearchExperiments": (
                page(tracking.SearchExperiments, pb.SearchExperimentsRequest),
                {"filter": f"name LIKE 'queries-{unique}%'"},
                {
                    "filter": {"filter": f"name LIKE 'queries-{unique}-%'"},
                    "order_by": {"order_by": ["name DESC"]},
                    "view_type": {"view_type": pb.VIEW_TYPE_ALL},
                },
            ),
            "SearchRuns": (
                page(tracking.SearchRuns, pb.SearchRunsRequest),
                {"experiment_ids": experiments[:1]},
                {
                    "filter": {"filter": "attributes.status = 'RUNNING'"},
                    "order_by": {"order_by": ["start_time DESC"]},
                    "view_type": {"view_type": pb.VIEW_TYPE_ALL},
                    "experiment_ids": {"experiment_ids": experiments},
                },
            ),
            "SearchRegisteredModels": (
                page(registry.SearchRegisteredModels, rpb.SearchRegisteredModelsRequest),
                {"filter": f"name LIKE 'queries-{unique}%'"},
                {
                    "filter": {"filter": f"name LIKE 'queries-{unique}-%'"},
                    "order_by": {"order_by": ["name DESC"]},
                },
            ),
            "SearchModelVersions": (
                page(registry.SearchModelVersions, rpb.SearchModelVersionsRequest),
                {"filter": f"name = '{model}'"},
                {
                    "filter": {"filter": f"name LIKE '{model}'"},
                    "order_by": {"order_by": ["version_number DESC"]},
                },
            ),
            "SearchLoggedModels": (
                page(tracking.SearchLoggedModels, pb.SearchLoggedModelsRequest),
                {"experiment_ids": experiments[:1]},
                {
                    "filter": {"filter": "name LIKE 'net-%'"},
                    "order_by": {
                        "order_by": [pb.LoggedModelOrder(field_name="name", ascending=False)]
                    },
                    "experiment_ids": {"experiment_ids": experiments},
                },
            ),
            "ListArtifacts": (
                page(tracking.ListArtifacts, pb.ListArtifactsRequest),
                {"run_id": runs[0], "path": "d"},
                {"path": {"path": ""}, "run": {"run_id": runs[1]}},
            ),
            "ListLoggedModelArtifacts": (
                page(tracking.ListLoggedModelArtifacts, pb.ListLoggedModelArtifactsRequest),
                {"model_id": logged[0], "path": "d"},
                {"path": {"path": ""}, "model": {"model_id": logged[1]}},
            ),
        }


QUERY_CHANGES = [
    ("SearchExperiments", "filter"),
    ("SearchExperiments", "order_by"),
    ("SearchExperiments", "view_type"),
    ("SearchRuns", "filter"),
    ("SearchRuns", "order_by"),
    ("SearchRuns", "view_type"),
    ("SearchRuns", "experiment_ids"),
    ("SearchRegisteredModels", "filter"),
    ("SearchRegisteredModels", "order_by"),
    ("SearchModelVersions", "filter"),
    ("SearchModelVersions", "order_by"),
    ("SearchLoggedModels", "filter"),
    ("SearchLoggedModels", "order_by"),
    ("SearchLoggedModels", "experiment_ids"),
    ("ListArtifacts", "path"),
    ("ListArtifacts", "run"),
    ("ListLoggedModelArtifacts", "path"),
    ("ListLoggedModelArtifacts", "model"),
]


@pytest.mark.parametrize(("rpc", "change"), QUERY_CHANGES)
def test_a_token_is_refused_by_another_query_of_the_same_rpc(queries, rpc, change):
    page, fields, others = queries[rpc]
    token = page(fields, "")
    assert token, "two results, one per page"
    assert page(fields, token) == ""  # the query it came from takes it
    with pytest.raises(grpc.RpcError) as err:
        page({**fields, **others[change]}, token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    error = error_from_rpc(err.value)
    assert (error.field, error.reason) == ("page_token", ErrorReason.INVALID_PAGE_TOKEN)
