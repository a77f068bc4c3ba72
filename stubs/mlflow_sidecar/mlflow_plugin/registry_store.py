"""`SidecarRegistryStore`: MLflow's model registry store for `sidecar://` URIs.

Aliases replace MLflow's deprecated stages: every version's stage reads "None", and
stage transitions are refused (NOT_IMPLEMENTED). A version's download URI is given in
the sidecar's artifact URIs, so that `mlflow.pyfunc.load_model("models:/NAME@alias")`
downloads through the sidecar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
from mlflow.entities.model_registry import RegisteredModel as MlflowRegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from mlflow.store.artifact.utils.models import _parse_model_uri
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.model_registry import (
    SEARCH_MODEL_VERSION_MAX_RESULTS_DEFAULT,
    SEARCH_MODEL_VERSION_MAX_RESULTS_THRESHOLD,
    SEARCH_REGISTERED_MODEL_MAX_RESULTS_DEFAULT,
    SEARCH_REGISTERED_MODEL_MAX_RESULTS_THRESHOLD,
)
from mlflow.store.model_registry.abstract_store import AbstractStore
from mlflow.store.model_registry.rest_store import RestStore

from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.core.domain import ModelVersion
from mlflow_sidecar.core.errors import ErrorReason, InvalidArgumentError, NotFoundError
from mlflow_sidecar.mlflow_plugin import entities, paging
from mlflow_sidecar.mlflow_plugin.connection import ProcessConnection, SidecarUri
from mlflow_sidecar.mlflow_plugin.errors import refuses_unoffered, translated, unsupported

_RUNS_PREFIX = "runs:/"


def _logged_model_id(source: str) -> str | None:
    """The logged model a `models:/<model id>` source names, else None."""
    if not source.startswith("models:/"):
        return None
    model_id: str | None = _parse_model_uri(source).model_id
    return model_id


def _version_number(version: Any) -> int:
    """A version as MLflow's stores take it (a number or its digits); anything else is
    INVALID_PARAMETER_VALUE, as MLflow says it."""
    try:
        return int(str(version))
    except ValueError:
        raise MlflowException(
            f"Parameter 'version' must be an integer, got '{version}'.",
            error_code=databricks_pb2.INVALID_PARAMETER_VALUE,
        ) from None


def _stored_version(name: str, version: Any) -> int:
    """A version a call reads or changes: below 1 none is stored, and MLflow says so with
    RESOURCE_DOES_NOT_EXIST (the sidecar's RPCs refuse it as INVALID_ARGUMENT)."""
    number = _version_number(version)
    if number < 1:
        raise MlflowException(
            f"Model Version (name={name}, version={number}) not found",
            error_code=databricks_pb2.RESOURCE_DOES_NOT_EXIST,
        )
    return number


def _tagged_version(name: str, version: Any) -> int:
    """The version a tag call names: MLflow reads 0 as no version given
    (INVALID_PARAMETER_VALUE, as the sidecar refuses it) and a negative one as missing."""
    number = _version_number(version)
    return number if number == 0 else _stored_version(name, number)


@refuses_unoffered(AbstractStore, RestStore)
class SidecarRegistryStore(AbstractStore):
    """MLflow's registry store for `sidecar://HOST:PORT` and `sidecar+tls://HOST:PORT`."""

    def __init__(self, store_uri: str, tracking_uri: str | None = None) -> None:
        super().__init__(store_uri, tracking_uri)
        self._process_connection = ProcessConnection(store_uri)
        self._root = self._process_connection.get().root

    @property
    def _registry(self) -> GrpcModelRegistry:
        return self._process_connection.get().registry

    @property
    def _tracking(self) -> GrpcExperimentTracking:
        return self._process_connection.get().tracking

    # -- registered models ----------------------------------------------------------------

    @translated
    def create_registered_model(
        self,
        name: str,
        tags: Any = None,
        description: str | None = None,
        deployment_job_id: str | None = None,
    ) -> MlflowRegisteredModel:
        if deployment_job_id:
            raise unsupported("A deployment job")
        created = self._registry.create_registered_model(
            name, description=description or "", tags=entities.tag_dict(tags)
        )
        return entities.registered_model(created)

    @translated
    def update_registered_model(
        self, name: str, description: str | None, deployment_job_id: str | None = None
    ) -> MlflowRegisteredModel:
        if deployment_job_id:
            raise unsupported("A deployment job")
        updated = self._registry.update_registered_model(name, description=description or "")
        return entities.registered_model(updated, self._latest(name))

    @translated
    def rename_registered_model(self, name: str, new_name: str) -> MlflowRegisteredModel:
        return entities.registered_model(self._registry.rename_registered_model(name, new_name))

    @translated
    def delete_registered_model(self, name: str) -> None:
        self._registry.delete_registered_model(name)

    @translated
    def search_registered_models(
        self,
        filter_string: str | None = None,
        max_results: int | None = None,
        order_by: Sequence[str] | None = None,
        page_token: str | None = None,
    ) -> PagedList[Any]:
        if isinstance(max_results, int) and not isinstance(max_results, bool) and max_results < 1:
            # MLflow's stores answer no models for these, unlike for versions, runs or
            # experiments, where they refuse them.
            return PagedList([], None)
        wanted = paging.checked_max_results(
            max_results,
            SEARCH_REGISTERED_MODEL_MAX_RESULTS_DEFAULT,
            SEARCH_REGISTERED_MODEL_MAX_RESULTS_THRESHOLD,
        )
        models, token = paging.collect(
            lambda size, token: self._registry.search_registered_models(
                filter_string=filter_string or "",
                order_by=tuple(order_by or ()),
                page_size=size,
                page_token=token,
            ),
            wanted,
            page_token,
        )
        # One lookup per model, as MLflow's answer carries each model's latest version:
        # bounded by max_results (at most 1,000 models).
        return PagedList(
            [entities.registered_model(m, self._latest_if_any(m.name)) for m in models], token
        )

    @translated
    def get_registered_model(self, name: str) -> MlflowRegisteredModel:
        model = self._registry.get_registered_model(name)
        return entities.registered_model(model, self._latest(name))

    @translated
    def get_latest_versions(
        self, name: str, stages: Sequence[str] | None = None
    ) -> list[MlflowModelVersion]:
        # Every version is in stage "None" here, so the latest of any other stage is none.
        if stages and not any(s.lower() == "none" for s in stages):
            self._registry.get_registered_model(name)  # a missing model is still NOT_FOUND
            return []
        return self._latest(name)

    @translated
    def set_registered_model_tag(self, name: str, tag: Any) -> None:
        self._registry.set_registered_model_tag(name, tag.key, str(tag.value))

    @translated
    def delete_registered_model_tag(self, name: str, key: str) -> None:
        self._registry.delete_registered_model_tag(name, key)

    # -- versions -------------------------------------------------------------------------

    @translated
    def create_model_version(
        self,
        name: str,
        source: str,
        run_id: str | None = None,
        tags: Any = None,
        run_link: str | None = None,
        description: str | None = None,
        local_model_path: str | None = None,
        model_id: str | None = None,
    ) -> MlflowModelVersion:
        if run_link:
            # CreateModelVersion has no run link: refused rather than dropped.
            raise unsupported("A model version's run_link")
        if model_id and not source.startswith("models:/"):
            # The sidecar resolves a logged model from its models:/ URI, as MLflow does.
            source = f"models:/{model_id}"
        tag_values = entities.tag_dict(tags)
        # A runs:/ source goes as given (a whole run's runs:/RUN too); only the sidecar's
        # own artifact URIs are turned into their run and path.
        own_run, artifact_path = (
            ("", "") if source.startswith(_RUNS_PREFIX) else (self._run_artifact(source))
        )
        if own_run:
            created = self._create_from_run(
                name, own_run, artifact_path, description=description or "", tags=tag_values
            )
        else:
            created = self._registry.create_model_version(
                name,
                source=source,
                run_id=run_id or "",
                description=description or "",
                tags=tag_values,
            )
        return entities.model_version(created)

    def _create_from_run(
        self, name: str, run_id: str, artifact_path: str, *, description: str, tags: Any
    ) -> ModelVersion:
        """A version of the run's files at `artifact_path`, its source the run's artifact
        location as MLflow has it (as MLflow's client stores one from a run's artifact URI),
        not this process's sidecar URI."""
        location = self._tracking.get_run(run_id).info.artifact_uri.rstrip("/")
        return self._registry.create_model_version(
            name,
            source=f"{location}/{artifact_path}" if artifact_path else location,
            run_id=run_id,
            description=description,
            tags=tags,
        )

    @translated
    def update_model_version(
        self, name: str, version: str | int, description: str | None
    ) -> MlflowModelVersion:
        updated = self._registry.update_model_version(
            name, _stored_version(name, version), description=description or ""
        )
        return entities.model_version(updated)

    def transition_model_version_stage(
        self, name: str, version: str | int, stage: str, archive_existing_versions: bool
    ) -> MlflowModelVersion:
        raise unsupported("A stage transition (use aliases)")

    @translated
    def delete_model_version(self, name: str, version: str | int) -> None:
        self._registry.delete_model_version(name, _stored_version(name, version))

    @translated
    def get_model_version(self, name: str, version: str | int) -> MlflowModelVersion:
        return entities.model_version(
            self._registry.get_model_version(name, _stored_version(name, version))
        )

    @translated
    def get_model_version_download_uri(self, name: str, version: str | int) -> str:
        return self._download_uri(
            self._registry.get_model_version(name, _stored_version(name, version))
        )

    @translated
    def search_model_versions(
        self,
        filter_string: str | None = None,
        max_results: int | None = None,
        order_by: Sequence[str] | None = None,
        page_token: str | None = None,
    ) -> PagedList[Any]:
        wanted = paging.checked_max_results(
            max_results,
            SEARCH_MODEL_VERSION_MAX_RESULTS_DEFAULT,
            SEARCH_MODEL_VERSION_MAX_RESULTS_THRESHOLD,
        )
        versions, token = paging.collect(
            lambda size, token: self._registry.search_model_versions(
                filter_string=filter_string or "",
                order_by=tuple(order_by or ()),
                page_size=size,
                page_token=token,
            ),
            wanted,
            page_token,
        )
        return PagedList([entities.model_version(v) for v in versions], token)

    @translated
    def set_model_version_tag(self, name: str, version: str | int, tag: Any) -> None:
        self._registry.set_model_version_tag(
            name, _tagged_version(name, version), tag.key, str(tag.value)
        )

    @translated
    def delete_model_version_tag(self, name: str, version: str | int, key: str) -> None:
        self._registry.delete_model_version_tag(name, _tagged_version(name, version), key)

    @translated
    def set_registered_model_alias(self, name: str, alias: str, version: str | int) -> None:
        self._registry.set_model_alias(name, alias, _version_number(version))

    @translated
    def delete_registered_model_alias(self, name: str, alias: str) -> None:
        try:
            self._registry.delete_model_alias(name, alias)
        except NotFoundError as exc:
            # An alias that is not set is deleted already, as MLflow has it; a missing
            # model is still an error.
            if exc.reason != ErrorReason.ALIAS_NOT_FOUND:
                raise
        except InvalidArgumentError as exc:
            # 'latest' and 'v<number>' are never set, so MLflow deletes nothing; the RPC
            # refuses them.
            if exc.reason != ErrorReason.RESERVED_ALIAS:
                raise
            self._registry.get_registered_model(name)

    @translated
    def get_model_version_by_alias(self, name: str, alias: str) -> MlflowModelVersion:
        if alias.lower() == "latest":
            # MLflow reads 'latest' as the highest version (what models:/NAME@latest loads);
            # the RPC leaves that to GetLatestModelVersion.
            try:
                latest = self._registry.get_latest_model_version(name)
            except NotFoundError as exc:
                if exc.reason != ErrorReason.MODEL_VERSION_NOT_FOUND:
                    raise
                raise MlflowException(
                    f"Latest version not found for model {name}.",
                    error_code=databricks_pb2.RESOURCE_DOES_NOT_EXIST,
                ) from None
            return entities.model_version(latest)
        return entities.model_version(self._registry.get_model_version_by_alias(name, alias))

    def copy_model_version(self, src_mv: Any, dst_name: str) -> MlflowModelVersion:
        raise unsupported("Copying a model version")

    # -- helpers --------------------------------------------------------------------------

    def _latest(self, name: str) -> list[MlflowModelVersion]:
        try:
            return [entities.model_version(self._registry.get_latest_model_version(name))]
        except NotFoundError:
            # A model without versions has no latest version; a missing model is an error.
            self._registry.get_registered_model(name)
            return []

    def _latest_if_any(self, name: str) -> list[MlflowModelVersion]:
        """The latest version of a model just found; none when it has none, or is gone, or
        its name is longer than a lookup takes (only SQLite, ignoring column widths, holds
        such names): one model must not fail the whole search."""
        try:
            return [entities.model_version(self._registry.get_latest_model_version(name))]
        except (NotFoundError, InvalidArgumentError):
            return []

    def _run_artifact(self, source: str) -> tuple[str, str]:
        """The run and artifact path of a `runs:/` source or one of the sidecar's artifact
        URIs; ("", "") for any other source."""
        if source.startswith(_RUNS_PREFIX):
            run_id, _, path = source[len(_RUNS_PREFIX) :].partition("/")
            return run_id, path.strip("/")
        if source.startswith(self._root + "/"):
            parts = SidecarUri.parse(source).path.split("/")
            if len(parts) >= 3 and parts[0] == "runs" and parts[2] == "artifacts":
                return parts[1], "/".join(parts[3:])
        return "", ""

    def _download_uri(self, version: ModelVersion) -> str:
        """Where a trainer downloads the version's files from: the sidecar's artifact URI
        of the logged model, or of the run's artifacts, the version was registered from."""
        model_id = version.model_id or _logged_model_id(version.source)
        if model_id:
            return entities.model_artifact_uri(self._root, model_id)
        run_id, path = self._run_artifact(version.source)
        if not run_id and version.run_id:
            run_root = self._tracking.get_run(version.run_id).info.artifact_uri.rstrip("/")
            if version.source == run_root or version.source.startswith(run_root + "/"):
                run_id, path = version.run_id, version.source[len(run_root) :].strip("/")
        if not run_id:
            raise MlflowException(
                f"Version {version.version} of {version.name!r} comes from {version.source!r},"
                " which is not a run's artifacts: the sidecar can serve only those",
                error_code=databricks_pb2.NOT_IMPLEMENTED,
            )
        uri = entities.run_artifact_uri(self._root, run_id)
        return f"{uri}/{path}" if path else uri
