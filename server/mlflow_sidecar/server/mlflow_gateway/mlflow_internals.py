"""Every MLflow API the sidecar uses that MLflow does not promise to keep: one place each.

MLflow's public client has no way to do these things (stream an artifact's bytes, read
every latest metric of a run as objects, resolve a models:/ URI, keep the embedded store's
artifacts in the data dir, drop a request header provider, page through logged models,
set a logged model's tags without a look-up that hides why it failed). Each is reached
through one function here, and tests/unit/test_mlflow_internals.py fails with a message
naming the API when an MLflow upgrade moves or changes one, instead of the sidecar failing
at run time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import requests
import sqlparse
from mlflow import environment_variables
from mlflow.exceptions import MlflowException
from mlflow.protos.service_pb2 import LogBatch
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.store.artifact.utils import models as model_uris
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking.fluent import get_active_model_id
from mlflow.tracking.request_header import registry as request_headers
from mlflow.utils import mime_type_utils, request_utils, rest_utils
from mlflow.utils.search_utils import (
    SearchExperimentsUtils,
    SearchLoggedModelsPaginationToken,
    SearchLoggedModelsUtils,
    SearchModelUtils,
    SearchModelVersionUtils,
    SearchUtils,
    _join_in_comparison_tokens,
)

from mlflow_sidecar.core.errors import InvalidArgumentError

# MLflow reads the artifact root of a SQL store built in-process from this variable (the
# one `mlflow server` sets), so the embedded store keeps artifacts in the data dir.
SERVER_ARTIFACT_ROOT_ENV = "_MLFLOW_SERVER_ARTIFACT_ROOT"

# MLflow's HTTP helpers (auth, TLS settings, error bodies as MlflowException), untyped.
http_request: Callable[..., Any] = rest_utils.http_request
raise_for_status: Callable[[Any], None] = request_utils.augmented_raise_for_status

# MLflow's models:/ URI parsing: stages, aliases, versions and logged model ids.
split_models_uri: Callable[[str], tuple[str, str]] = ModelsArtifactRepository.split_models_uri
model_name_and_version: Callable[[Any, str], tuple[str, ...]] = (
    model_uris.get_model_name_and_version
)
_parse_model_uri: Callable[[str], Any] = model_uris._parse_model_uri


def logged_model_id(source: str) -> str | None:
    """The logged model id of a `models:/<model id>` source (MLflow 3), else None;
    INVALID_ARGUMENT on `source` for a `models:` URI MLflow cannot read (a path below
    the model, a trailing slash)."""
    if not source.lower().startswith("models:"):
        return None
    try:
        model_id: str | None = _parse_model_uri(source).model_id
    except MlflowException:
        raise InvalidArgumentError(
            "source",
            f"{source!r} is not a models:/ URI MLflow reads: models:/NAME/VERSION,"
            " models:/NAME@ALIAS or models:/MODEL_ID, nothing after it",
        ) from None
    return model_id


def logged_models_page_token(
    offset: int,
    *,
    experiment_ids: list[str],
    filter_string: str | None,
    order_by: list[dict[str, Any]] | None,
) -> str:
    """MLflow's page token for the logged models search at `offset`. Unlike its other
    offset tokens it names the search it belongs to, and MLflow refuses it for any other
    (the arguments must equal those the store is called with)."""
    token = SearchLoggedModelsPaginationToken(
        experiment_ids=experiment_ids,
        filter_string=filter_string,
        order_by=order_by,
        offset=offset,
    )
    return str(token.encode())


def set_logged_model_tags(client: Any, model_id: str, tags: dict[str, str]) -> None:
    """Set a logged model's tags without `MlflowClient`'s look-up before, which answers
    any failure of that look-up (a missing model, an unreachable server) as an invalid
    parameter. The store answers a missing model as RESOURCE_DOES_NOT_EXIST itself."""
    client._tracking_client.set_logged_model_tags(model_id, tags)


def mlflow_settings() -> list[Any]:
    """Every variable MLflow reads from the environment, as the objects its code reads
    them through (`name`, `is_set()`, and `get()`, which raises ValueError for a value
    of the wrong type)."""
    setting = environment_variables._EnvironmentVariable
    return [v for v in vars(environment_variables).values() if isinstance(v, setting)]


def rest_store(client: Any) -> Any | None:
    """The client's tracking store when it sends `log_batch` to a tracking server exactly
    as MLflow's `RestStore` does (not a subclass with its own `log_batch`), else None."""
    store = client._tracking_client.store
    if isinstance(store, RestStore) and type(store).log_batch is RestStore.log_batch:
        return store
    return None


def _number(value: float) -> float | str:
    # Protobuf's JSON names the doubles JSON cannot hold; MLflow's server parses them back.
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def log_batch_metrics_json(run_id: str, metrics: Sequence[tuple[str, float, int, int]]) -> str:
    """The body `RestStore.log_batch` sends for these (key, value, timestamp ms, step)
    points, built from plain values: MLflow builds protobuf messages and converts them
    (about 15 ms of CPU per 1000 points, ten times this), and the sidecar sends most
    points in such batches. Points get the active model id as MLflow's client gives them."""
    model_id = get_active_model_id()
    points: list[dict[str, object]] = [
        {"key": key, "value": _number(value), "timestamp": timestamp, "step": step}
        for key, value, timestamp, step in metrics
    ]
    if model_id:
        for point in points:
            point["model_id"] = model_id
    return json.dumps({"run_id": run_id, "metrics": points}, separators=(",", ":"))


def post_log_batch(store: Any, body: str) -> None:
    """Send a `log_batch` body through the store's endpoint call: MLflow's credentials,
    TLS settings, retries and error answers, as for its own `log_batch`."""
    store._call_endpoint(LogBatch, body)


# MLflow's settings read from the environment, as its own client reads them (untyped).
_settings: Any = environment_variables
_cloud_storage_http_request: Callable[..., Any] = request_utils.cloud_storage_http_request

_guess_mime_type: Callable[[str], str] = mime_type_utils._guess_mime_type


def guess_mime_type(file_name: str) -> str:
    """The Content-Type MLflow's own artifact client sends for this file name."""
    return str(_guess_mime_type(file_name))


def build_registry_client(client: Any) -> None:
    """Make `client`'s registry client now: MlflowClient builds it at its first registry
    call, and only then says that the registry URI names no store MLflow has."""
    client._get_registry_client()


def host_creds(repo: Any) -> Any:
    """The credentials and TLS settings an HTTP artifact repository calls MLflow with."""
    return repo._host_creds


def multipart_upload_enabled(repo: Any) -> bool:
    """Whether an HTTP artifact repository uploads through MLflow's multipart protocol."""
    return bool(repo._is_multipart_upload_enabled())


def uploads_in_parts(repo: Any, size_bytes: int) -> bool:
    """Whether MLflow's own client sends a file of this size to this repository in
    presigned parts rather than in one PUT (its `_should_multipart_upload`, which takes a
    file): multipart is on and the file reaches `MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE`.
    An S3-backed server turns multipart on by itself (its /server-info says so)."""
    if size_bytes < int(_settings.MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE.get()):
        return False
    return multipart_upload_enabled(repo)


@dataclass(frozen=True)
class PresignedDownload:
    """Where MLflow's server lets a client read an artifact from the object store itself."""

    url: str
    headers: dict[str, str]
    size_bytes: int | None


def presigned_download(repo: Any, artifact_path: str) -> PresignedDownload | None:
    """The presigned URL MLflow's own client downloads this file from, when the server
    offers one (a server in front of S3 and similar stores says so in /server-info;
    `MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD` overrides it, as for MLflow's client).

    None when it does not: another artifact store, an MLflow without presigned downloads,
    or a server that answers the presign request with 404 or 501 (MLflow's own fallback)."""
    enabled = getattr(repo, "_is_multipart_download_enabled", None)
    if enabled is None or not enabled():
        return None
    try:
        answer = repo._get_presigned_download_url(artifact_path)
    except requests.HTTPError as exc:
        status = None if exc.response is None else exc.response.status_code
        if status in (HTTPStatus.NOT_FOUND, HTTPStatus.NOT_IMPLEMENTED):
            return None
        raise
    size = answer.file_size
    return PresignedDownload(
        url=str(answer.url),
        headers={str(k): str(v) for k, v in (answer.headers or {}).items()},
        size_bytes=None if size is None else int(size),
    )


def request_timeout_s() -> float:
    """How long MLflow's client waits for an answer to one HTTP request
    (`MLFLOW_HTTP_REQUEST_TIMEOUT`, which the sidecar sets from mlflow.request_timeout_s)."""
    return float(_settings.MLFLOW_HTTP_REQUEST_TIMEOUT.get())


def object_store_get(url: str, headers: dict[str, str], connect_timeout_s: float) -> Any:
    """A streamed GET of a presigned object-store URL, with the timeout and TLS setting
    (`MLFLOW_S3_IGNORE_TLS`) MLflow's own client uses for it; no MLflow credentials go
    with it (the URL carries its own). No retries: the caller has the proxy to fall back
    on, and urllib3 would log each retry with the URL, whose query is a credential.
    `connect_timeout_s` bounds the wait for a store whose packets are dropped."""
    return _cloud_storage_http_request(
        "get",
        url,
        max_retries=0,
        stream=True,
        headers=headers,
        timeout=(connect_timeout_s, _settings.MLFLOW_HTTP_REQUEST_TIMEOUT.get()),
        verify=not _settings.MLFLOW_S3_IGNORE_TLS.get(),
    )


def metric_objects(run_data: Any) -> list[Any]:
    """Every latest metric of a run as Metric objects (with step and timestamp); MLflow's
    public `RunData.metrics` keeps only the values."""
    return list(run_data._metric_objs)


def request_header_providers() -> list[Any] | None:
    """MLflow's list of request header providers, to edit in place; None when it is not
    where it used to be (the providers are then left as they are)."""
    registry = getattr(request_headers._request_header_provider_registry, "_registry", None)
    return registry if isinstance(registry, list) else None


def download_artifacts(repo: Any, artifact_path: str, dst_dir: str) -> str:
    """`repo.download_artifacts(artifact_path, dst_dir)`, raising the first file's own
    failure.

    MLflow downloads the files in a pool and reports their failures folded into one
    MlflowException of code INTERNAL_ERROR when they are not MlflowExceptions (the artifact
    proxy's HTTP refusals are not), which would hide what MLflow answered: a refusal would
    read as a failure of the sidecar."""
    failures: list[Exception] = []
    download_file = repo._download_file
    # MLflow's HTTP repositories put the file's path into the URL as it is: a '?' in a
    # stored file's name would start a query, and fetch another file in its place.
    over_http = isinstance(repo, HttpArtifactRepository)

    def recorded(remote_file_path: str, local_path: str) -> Any:
        try:
            if over_http:
                remote_file_path = quote(remote_file_path, safe="/")
            return download_file(remote_file_path, local_path)
        except Exception as exc:
            failures.append(exc)
            raise

    repo._download_file = recorded
    try:
        return str(repo.download_artifacts(artifact_path, dst_dir))
    except MlflowException as exc:
        if failures and exc.error_code == "INTERNAL_ERROR":
            raise failures[0] from exc
        raise


# How MLflow reads a search's filter and `order_by` terms, per entity. The fields its SQL
# stores sort by, as they tell terms apart: each store refuses two terms on one field
# with an untyped error (HTTP 500), so the sidecar checks first. And which part of a
# search MLflow refused: its message names none. Each raises MlflowException for what
# MLflow cannot parse.
_search_utils: Any = SearchUtils
_model_version_search: Any = SearchModelVersionUtils
_experiment_search: Any = SearchExperimentsUtils
_registered_model_search: Any = SearchModelUtils

_logged_model_search: Any = SearchLoggedModelsUtils
# Each parses a filter into its terms, one dict each with its "type" ("metric", "tag",
# "attribute", ...), "key", "comparator" and "value".
_Parse = Callable[[str], Sequence[Mapping[str, Any]]]
parse_runs_filter: _Parse = _search_utils.parse_search_filter
parse_experiments_filter: _Parse = _experiment_search.parse_search_filter
parse_registered_models_filter: _Parse = _registered_model_search.parse_search_filter
parse_model_versions_filter: _Parse = _model_version_search.parse_search_filter
parse_logged_models_filter: _Parse = _logged_model_search.parse_search_filter

# How MLflow's SQL store reads a logged model filter, which is not how the parser above
# reads it: each term's entity is `<type>.<key>`, else an attribute named by a column of
# its logged_models table or by one of the aliases below (MLflow 3's SqlLoggedModel, which
# mlflow-skinny lacks). It compares a metric or a time by the term's value as a float. An
# attribute it has no column for, or a number that is not one, fails it with an untyped
# server error (HTTP 500), which reads as an outage.
LOGGED_MODEL_COLUMNS = frozenset(
    {
        "model_id",
        "experiment_id",
        "name",
        "artifact_location",
        "creation_timestamp_ms",
        "last_updated_timestamp_ms",
        "status",
        "lifecycle_stage",
        "model_type",
        "source_run_id",
        "status_message",
    }
)
LOGGED_MODEL_COLUMN_ALIASES: Mapping[str, str] = {
    "creation_time": "creation_timestamp_ms",
    "creation_timestamp": "creation_timestamp_ms",
    "last_updated_timestamp": "last_updated_timestamp_ms",
}
_join_comparisons: Callable[[Any], Sequence[Any]] = _join_in_comparison_tokens
_NUMERIC_LOGGED_MODEL_COLUMNS = frozenset({"creation_timestamp_ms", "last_updated_timestamp_ms"})
_TYPED_ENTITY = re.compile(r"^([a-z]+)\.(.+)$")


@dataclass(frozen=True)
class LoggedModelTerm:
    """One term of a logged model filter as MLflow's SQL store reads it: `identifier` as
    written, `kind` the entity type ("attributes", "metrics", ...), `key` what the store
    looks up (a bare attribute's alias resolved), `value` the term's value as written."""

    identifier: str
    kind: str
    key: str
    value: str

    @property
    def numeric(self) -> bool:
        """True when the store compares the value as a float."""
        column = LOGGED_MODEL_COLUMN_ALIASES.get(self.key, self.key)
        return self.kind == "metrics" or (
            self.kind == "attributes" and column in _NUMERIC_LOGGED_MODEL_COLUMNS
        )


def logged_model_filter_terms(filter_string: str) -> list[LoggedModelTerm]:
    """The comparisons of a logged model filter as MLflow's SQL store splits them; [] for
    a filter it cannot split, which it refuses itself (INVALID_PARAMETER_VALUE)."""
    try:
        statements = sqlparse.parse(filter_string)
    except Exception:  # noqa: BLE001 - whatever sqlparse raises, the store refuses it too
        return []
    if len(statements) != 1:
        return []
    terms = []
    for token in _join_comparisons(statements[0].tokens):
        if not isinstance(token, sqlparse.sql.Comparison):
            continue
        words = [str(t) for t in token.tokens if not t.is_whitespace]
        if len(words) != 3:
            continue
        identifier, _op, value = words
        if typed := _TYPED_ENTITY.match(identifier):
            kind, key = typed.group(1), typed.group(2).strip("`")
        else:
            # The aliases hold only here: `attributes.creation_time` names no column.
            kind, key = "attributes", LOGGED_MODEL_COLUMN_ALIASES.get(identifier, identifier)
            key = key.strip("`")
        terms.append(LoggedModelTerm(identifier, kind, key, value))
    return terms


def experiment_order_field(term: str) -> str:
    """The field a `search_experiments` order_by term sorts by."""
    _type, key, _ascending = _experiment_search.parse_order_by_for_search_experiments(term)
    return str(key)


def run_order_field(term: str) -> tuple[str, str]:
    """The field a `search_runs` order_by term sorts by: (key type, key)."""
    key_type, key, _ascending = _search_utils.parse_order_by_for_search_runs(term)
    return str(key_type), str(_search_utils.translate_key_alias(key))


def registered_model_order_field(term: str) -> str:
    """The field a `search_registered_models` order_by term sorts by."""
    key, _ascending = _search_utils.parse_order_by_for_search_registered_models(term)
    # Both timestamp keys sort by the model's last update.
    return "timestamp" if key in _search_utils.VALID_TIMESTAMP_ORDER_BY_KEYS else str(key)


def model_version_order_field(term: str) -> str:
    """The field a `search_model_versions` order_by term sorts by."""
    _type, key, _ascending = _model_version_search.parse_order_by_for_search_model_versions(term)
    return str(key)
