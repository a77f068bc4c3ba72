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

from collections.abc import Callable
from typing import Any

from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.store.artifact.utils import models as model_uris
from mlflow.tracking.request_header import registry as request_headers
from mlflow.utils import mime_type_utils, request_utils, rest_utils
from mlflow.utils.search_utils import SearchLoggedModelsPaginationToken

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
    """The logged model id of a `models:/<model id>` source (MLflow 3), else None."""
    if not source.lower().startswith("models:/"):
        return None
    model_id: str | None = _parse_model_uri(source).model_id
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


_guess_mime_type: Callable[[str], str] = mime_type_utils._guess_mime_type


def guess_mime_type(file_name: str) -> str:
    """The Content-Type MLflow's own artifact client sends for this file name."""
    return str(_guess_mime_type(file_name))


def host_creds(repo: Any) -> Any:
    """The credentials and TLS settings an HTTP artifact repository calls MLflow with."""
    return repo._host_creds


def multipart_upload_enabled(repo: Any) -> bool:
    """Whether an HTTP artifact repository uploads through MLflow's multipart protocol."""
    return bool(repo._is_multipart_upload_enabled())


def metric_objects(run_data: Any) -> list[Any]:
    """Every latest metric of a run as Metric objects (with step and timestamp); MLflow's
    public `RunData.metrics` keeps only the values."""
    return list(run_data._metric_objs)


def request_header_providers() -> list[Any] | None:
    """MLflow's list of request header providers, to edit in place; None when it is not
    where it used to be (the providers are then left as they are)."""
    registry = getattr(request_headers._request_header_provider_registry, "_registry", None)
    return registry if isinstance(registry, list) else None
