"""The MLflow internals the sidecar relies on are still there, in the shape it expects.

Each test names the internal it checks: when an MLflow upgrade breaks one, the failure
says which, and `mlflow_gateway/mlflow_internals.py` is the one place to adapt."""

from __future__ import annotations

import inspect
import json
import math
import os
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, RunData
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.tracking.request_header.abstract_request_header_provider import (
    RequestHeaderProvider,
)
from mlflow.utils.search_utils import SearchLoggedModelsPaginationToken

from mlflow_sidecar.server.mlflow_gateway import mlflow_internals, search_terms


def _parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def _changed(api: str) -> str:
    return f"MLflow changed {api}, which the sidecar uses: adapt mlflow_internals.py"


def test_run_data_keeps_metric_objects():
    metric = Metric("loss", 0.5, 1_000, 3)
    found = mlflow_internals.metric_objects(RunData(metrics=[metric]))
    assert [(m.key, m.value, m.timestamp, m.step) for m in found] == [("loss", 0.5, 1_000, 3)], (
        _changed("RunData._metric_objs")
    )


def test_request_header_providers_are_a_list_of_providers():
    providers = mlflow_internals.request_header_providers()
    assert providers is not None, _changed("request_header registry._registry")
    assert providers and all(isinstance(p, RequestHeaderProvider) for p in providers), _changed(
        "request_header registry._registry"
    )


@pytest.mark.parametrize("repo_class", [HttpArtifactRepository, MlflowArtifactsRepository])
def test_http_artifact_repositories_expose_credentials_and_the_multipart_switch(
    repo_class, monkeypatch
):
    monkeypatch.delenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", raising=False)
    uri = (
        "http://mlflow.example:5000/api/2.0/mlflow-artifacts/artifacts/1/run/artifacts"
        if repo_class is HttpArtifactRepository
        else "mlflow-artifacts://mlflow.example:5000/1/run/artifacts"
    )
    repo = repo_class(uri, tracking_uri="http://mlflow.example:5000")
    creds = mlflow_internals.host_creds(repo)
    assert str(getattr(creds, "host", "")).startswith("http://mlflow.example:5000"), _changed(
        f"{repo_class.__name__}._host_creds"
    )
    assert mlflow_internals.multipart_upload_enabled(repo) is False, _changed(
        f"{repo_class.__name__}._is_multipart_upload_enabled"
    )


def test_mlflows_artifact_proxy_client_still_asks_for_presigned_downloads():
    for api in ("_is_multipart_download_enabled", "_get_presigned_download_url"):
        assert callable(getattr(MlflowArtifactsRepository, api, None)), _changed(
            f"MlflowArtifactsRepository.{api}"
        )
    assert _parameters(MlflowArtifactsRepository._get_presigned_download_url)[1:] == [
        "remote_file_path"
    ], _changed("MlflowArtifactsRepository._get_presigned_download_url")


def test_the_multipart_upload_threshold_is_mlflows_setting(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", "4096")
    repo = HttpArtifactRepository("http://mlflow.example:5000/api/2.0/mlflow-artifacts/artifacts/x")
    assert mlflow_internals.uploads_in_parts(repo, 4095) is False
    assert mlflow_internals.uploads_in_parts(repo, 4096) is True, _changed(
        "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE"
    )


def test_mime_types_are_guessed_from_the_file_name():
    guessed = [mlflow_internals.guess_mime_type(n) for n in ("a.png", "MLmodel", "w.bin")]
    assert guessed == ["image/png", "text/plain", "application/octet-stream"], _changed(
        "mime_type_utils._guess_mime_type"
    )


def test_http_helpers_take_what_the_sidecar_passes():
    expected = {"host_creds", "endpoint", "method", "max_retries", "extra_headers"}
    assert expected <= set(_parameters(mlflow_internals.http_request)), _changed(
        "rest_utils.http_request"
    )
    assert set(_parameters(mlflow_internals.http_request)) & {"data", "kwargs", "stream"} or any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(mlflow_internals.http_request).parameters.values()
    ), _changed("rest_utils.http_request (request keyword arguments)")
    assert _parameters(mlflow_internals.raise_for_status) == ["response"], _changed(
        "request_utils.augmented_raise_for_status"
    )


def test_models_uris_are_split_and_resolved():
    assert mlflow_internals.split_models_uri("models:/agent/3/sub/dir") == (
        "models:/agent/3",
        "sub/dir",
    ), _changed("ModelsArtifactRepository.split_models_uri")
    assert _parameters(mlflow_internals.model_name_and_version) == ["client", "models_uri"], (
        _changed("store.artifact.utils.models.get_model_name_and_version")
    )


def test_logged_model_ids_are_read_from_their_models_uri():
    assert mlflow_internals.logged_model_id("models:/m-0123456789abcdef") == (
        "m-0123456789abcdef"
    ), _changed("store.artifact.utils.models._parse_model_uri")
    assert mlflow_internals.logged_model_id("models:/agent/3") is None, _changed(
        "store.artifact.utils.models._parse_model_uri"
    )
    assert mlflow_internals.logged_model_id("runs:/abc/model") is None


def test_the_server_artifact_root_variable_is_the_one_mlflow_reads(monkeypatch, tmp_path):
    monkeypatch.setenv(mlflow_internals.SERVER_ARTIFACT_ROOT_ENV, str(tmp_path))
    name = "_SERVER_ARTIFACT_ROOT_ENV_VAR"
    assert getattr(tracking_utils, name, None) == mlflow_internals.SERVER_ARTIFACT_ROOT_ENV, (
        _changed(f"tracking._tracking_service.utils.{name}")
    )
    assert os.environ[getattr(tracking_utils, name)] == str(tmp_path)


def test_a_logged_models_page_token_is_one_mlflow_accepts_for_its_search():
    ordering = [{"field_name": "name", "ascending": True, "dataset_name": None}]
    token = mlflow_internals.logged_models_page_token(
        4, experiment_ids=["1"], filter_string="name = 'a'", order_by=ordering
    )
    decoded = SearchLoggedModelsPaginationToken.decode(token)
    decoded.validate(["1"], "name = 'a'", ordering)
    assert decoded.offset == 4, _changed("search_utils.SearchLoggedModelsPaginationToken")
    with pytest.raises(MlflowException):
        decoded.validate(["2"], "name = 'a'", ordering)


def test_logged_model_tags_are_set_through_the_tracking_client():
    tracking_client = getattr(MlflowClient("sqlite:///:memory:"), "_tracking_client", None)
    method = getattr(tracking_client, "set_logged_model_tags", None)
    assert method is not None, _changed("MlflowClient._tracking_client.set_logged_model_tags")
    assert _parameters(method) == ["model_id", "tags"], _changed(
        "TrackingServiceClient.set_logged_model_tags"
    )


def _mlflow_log_batch_body(run_id: str, points: list[tuple[str, float, int, int]]) -> Any:
    """The body MLflow's own client sends for these points (`RestStore.log_batch`, after
    `TrackingServiceClient.log_batch` gave each the active model id)."""
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.tracking.fluent import get_active_model_id
    from mlflow.utils.proto_json_utils import message_to_json

    protos = [
        Metric(key, value, ts, step, model_id=get_active_model_id()).to_proto()
        for key, value, ts, step in points
    ]
    return json.loads(message_to_json(LogBatch(run_id=run_id, metrics=protos)))


_POINTS = [
    ("loss", 0.5, 1_700_000_000_000, 0),
    ("loss/ä 1", -0.0, 1, -3),
    ("q", math.nan, 2**62, 2**62),
    ("q", math.inf, 0, 1),
    ("q", -math.inf, 5, 2),
    ("tiny", 5e-324, 7, 9),
    ("big", 1e308, 8, 10),
]


@pytest.mark.parametrize("active_model", ["", "m-0123456789abcdef"])
def test_log_batch_body_is_the_one_mlflow_sends(active_model, monkeypatch):
    if active_model:
        monkeypatch.setenv("MLFLOW_ACTIVE_MODEL_ID", active_model)
    else:
        monkeypatch.delenv("MLFLOW_ACTIVE_MODEL_ID", raising=False)
    ours = json.loads(mlflow_internals.log_batch_metrics_json("r" * 32, _POINTS))
    assert ours == _mlflow_log_batch_body("r" * 32, _POINTS), _changed(
        "RestStore.log_batch's request body"
    )


def test_a_rest_store_is_found_only_where_mlflow_would_post_log_batch(tmp_path):
    from mlflow.store.tracking.rest_store import RestStore

    remote = MlflowClient(tracking_uri="http://mlflow.example:5000")
    store = mlflow_internals.rest_store(remote)
    assert isinstance(store, RestStore), _changed("TrackingServiceClient.store")
    assert _parameters(store._call_endpoint)[:2] == ["api", "json_body"], _changed(
        "RestStore._call_endpoint"
    )
    local = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow_internals.rest_store(local) is None


def test_a_rest_store_with_its_own_log_batch_is_left_to_it(monkeypatch):
    from mlflow.store.tracking.rest_store import RestStore

    class OwnLogBatch(RestStore):  # type: ignore[misc]
        def log_batch(self, run_id, metrics, params, tags):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    client = MlflowClient(tracking_uri="http://mlflow.example:5000")
    own = OwnLogBatch(client._tracking_client.store.get_host_creds)
    monkeypatch.setattr(type(client._tracking_client), "store", property(lambda _: own))
    assert mlflow_internals.rest_store(client) is None


RUN_TERMS = [
    "metrics.loss",
    "metric.`loss` DESC",
    "metrics.reward",
    "params.loss",
    "tags.loss",
    "start_time",
    "attributes.start_time DESC",
    "attribute.created",
    "run_name",
    "attributes.run_name DESC",
    "tags.`mlflow.runName`",
    "attributes.Created",
    "end_time",
]
REGISTERED_MODEL_TERMS = ["name", "name DESC", "timestamp", "last_updated_timestamp DESC"]
MODEL_VERSION_TERMS = [
    "name",
    "version_number DESC",
    "version_number",
    "creation_timestamp",
    "last_updated_timestamp",
]


@pytest.fixture(scope="module")
def sql_client(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    db = tmp_path_factory.mktemp("order-by") / "mlflow.db"
    return MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")


def _mlflow_refuses_as_repeated(search: Any, terms: list[str]) -> bool:
    try:
        search(terms)
    except MlflowException as exc:
        assert "duplicate" in exc.message, exc.message
        return True
    return False


@pytest.mark.parametrize(
    ("field_of", "search_of", "terms"),
    [
        (
            mlflow_internals.run_order_field,
            lambda client: lambda terms: client.search_runs(["0"], order_by=terms),
            RUN_TERMS,
        ),
        (
            mlflow_internals.registered_model_order_field,
            lambda client: lambda terms: client.search_registered_models(order_by=terms),
            REGISTERED_MODEL_TERMS,
        ),
        (
            mlflow_internals.model_version_order_field,
            lambda client: lambda terms: client.search_model_versions(order_by=terms),
            MODEL_VERSION_TERMS,
        ),
    ],
    ids=["runs", "registered-models", "model-versions"],
)
def test_order_fields_are_the_ones_mlflows_sql_store_tells_apart(
    sql_client, field_of, search_of, terms
):
    search = search_of(sql_client)
    for first in terms:
        for second in terms:
            if first == second:
                continue
            same = field_of(first) == field_of(second)
            assert _mlflow_refuses_as_repeated(search, [first, second]) == same, _changed(
                f"how its SQL store tells order_by fields apart ({first!r}, {second!r})"
            )


@pytest.mark.parametrize(
    ("grammar", "good_filter", "good_term"),
    [
        (search_terms.RUNS, "metrics.loss < 1 and params.lr = '0.1'", "metrics.loss DESC"),
        (search_terms.EXPERIMENTS, "name LIKE 'ppo-%'", "creation_time DESC"),
        (search_terms.REGISTERED_MODELS, "name = 'agent'", "last_updated_timestamp"),
        (search_terms.MODEL_VERSIONS, "name = 'agent' and run_id = 'r'", "version_number DESC"),
    ],
    ids=["runs", "experiments", "registered-models", "model-versions"],
)
def test_search_grammars_parse_as_mlflow_does(grammar, good_filter, good_term):
    grammar.parse_filter(good_filter)
    grammar.order_field(good_term)
    with pytest.raises(MlflowException):
        grammar.parse_filter("name = 'unterminated")
    with pytest.raises(MlflowException):
        grammar.order_field("no_such_column")


def test_logged_model_filters_are_read_as_mlflows_sql_store_reads_them():
    from mlflow.store.tracking.dbmodels.models import SqlLoggedModel
    from mlflow.utils.search_logged_model_utils import parse_filter_string

    columns = {column.key for column in SqlLoggedModel.__table__.columns}
    assert columns == mlflow_internals.LOGGED_MODEL_COLUMNS, _changed("its logged_models table")
    assert dict(SqlLoggedModel.ALIASES) == dict(mlflow_internals.LOGGED_MODEL_COLUMN_ALIASES), (
        _changed("the names its SQL store takes for logged model columns")
    )
    written = (
        "name = 'a' AND attributes.creation_time > 1 AND metrics.`m 1` >= 0.5"
        " AND params.lr = '0.1' AND `model_type` IN ('x', 'y')"
    )
    read = [
        (c.entity.type.value, c.entity.key, c.entity.is_numeric())
        for c in parse_filter_string(written)
    ]
    ours = [(t.kind, t.key, t.numeric) for t in mlflow_internals.logged_model_filter_terms(written)]
    assert ours == read, _changed("how its SQL store reads a logged model filter")
