"""MLflow 3's logged models at the MLflow seam: their metadata and their files.

A logged model keeps its files under its own artifact location (not under a run's), so
its files are stored and read through that location's artifact repository, after the
location is checked against the sidecar's storage policy like a run's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LifecycleStage,
    LoggedModelInput,
    LoggedModelOutput,
)
from mlflow.entities import LoggedModel as MlflowLoggedModel
from mlflow.entities import LoggedModelStatus as MlflowStatus
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from mlflow_sidecar.core import domain
from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    ErrorReason,
    FailedPreconditionError,
    NotFoundError,
)
from mlflow_sidecar.core.logged_models import DatasetUse, LoggedModel, LoggedModelStatus
from mlflow_sidecar.server.mlflow_gateway import mlflow_internals, page_tokens, search_terms
from mlflow_sidecar.server.mlflow_gateway.entities import ms, text, user_tags
from mlflow_sidecar.server.mlflow_gateway.gateway import MlflowGateway

_PAGE_KIND = "logged_models"


def logged_model(model: MlflowLoggedModel) -> LoggedModel:
    """MLflow's logged model as the domain's."""
    status = str(getattr(model.status, "name", model.status) or "PENDING").upper()
    return LoggedModel(
        model_id=model.model_id,
        experiment_id=str(model.experiment_id),
        name=text(model.name),
        artifact_location=text(model.artifact_location),
        creation_time_ms=ms(model.creation_timestamp),
        last_updated_time_ms=ms(model.last_updated_timestamp),
        model_type=text(model.model_type),
        source_run_id=text(model.source_run_id),
        status=LoggedModelStatus.__members__.get(status, LoggedModelStatus.PENDING),
        status_message=text(model.status_message),
        tags=user_tags(model.tags),
        params=dict(model.params or {}),
    )


def _new_outputs(
    run_id: str, outputs: Sequence[tuple[str, int]], recorded: Mapping[str, int]
) -> list[LoggedModelOutput]:
    """The outputs the run does not have yet; ALREADY_EXISTS for a model it has as an
    output at another step."""
    new: list[LoggedModelOutput] = []
    for model_id, step in dict(outputs).items():
        if model_id not in recorded:
            new.append(LoggedModelOutput(model_id, step))
        elif recorded[model_id] != step:
            raise AlreadyExistsError(
                f"model {model_id} is an output of run {run_id} already, at step"
                f" {recorded[model_id]}: MLflow records a model as a run's output once",
                metadata={"model_id": model_id, "step": str(recorded[model_id])},
            )
    return new


class LoggedModelGateway:
    """Logged models through the gateway's retries, error mapping and storage policy."""

    def __init__(self, gateway: MlflowGateway) -> None:
        self._gateway = gateway

    @property
    def _client(self) -> MlflowClient:
        return self._gateway.client

    def create(
        self,
        experiment_id: str,
        *,
        name: str,
        model_type: str,
        source_run_id: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
    ) -> LoggedModel:
        """Create a logged model in PENDING status. Not retried: a retry could make two
        (the request ledger answers a repeated request_id with the first outcome)."""
        created = self._gateway.call(
            lambda: self._client.create_logged_model(
                experiment_id,
                name=name or None,
                source_run_id=source_run_id or None,
                tags=dict(tags) or None,
                params=dict(params) or None,
                model_type=model_type or None,
            ),
            retry=False,
            not_found=ErrorReason.EXPERIMENT_NOT_FOUND,
            invalid_field="experiment_id",
        )
        return logged_model(created)

    def get(self, model_id: str) -> LoggedModel:
        """One logged model."""
        return logged_model(
            self._gateway.call(
                lambda: self._client.get_logged_model(model_id),
                not_found=ErrorReason.LOGGED_MODEL_NOT_FOUND,
            )
        )

    def search(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str,
        order_by: Sequence[tuple[str, bool]],
        page_size: int,
        page_token: str,
    ) -> domain.Page[LoggedModel]:
        """One page of the experiments' logged models matching an MLflow filter."""
        search_terms.check_logged_model_filter(filter_string)
        search_terms.check_joins(
            search_terms.LOGGED_MODELS, filter_string, [field for field, _ in order_by]
        )
        ids = list(experiment_ids)
        mlflow_filter = filter_string or None
        # With the dataset keys `mlflow server` adds when it rebuilds the ordering from its
        # request: MLflow's page token must name the ordering the store sees, on the
        # embedded store and behind a server alike.
        ordering = [
            {"field_name": f, "ascending": a, "dataset_name": None, "dataset_digest": None}
            for f, a in order_by
        ] or None
        kind = page_tokens.of_query(_PAGE_KIND, ids, filter_string, order_by)
        offset = page_tokens.offset(kind, page_token)
        mlflow_token = (
            mlflow_internals.logged_models_page_token(
                offset, experiment_ids=ids, filter_string=mlflow_filter, order_by=ordering
            )
            if offset
            else None
        )
        paged: Any = self._gateway.call_search(
            lambda: self._client.search_logged_models(
                experiment_ids=ids,
                filter_string=mlflow_filter,
                max_results=page_size,
                order_by=ordering,
                page_token=mlflow_token,
            ),
            filter_string=filter_string,
            order_by=[f for f, _ in order_by],
            page_token=page_token,
            experiment_ids=ids,
            order_term_field=".field_name",
        )
        return domain.Page(
            tuple(logged_model(m) for m in paged),
            page_tokens.from_mlflow(kind, paged.token),
        )

    def finalize(self, model_id: str, status: LoggedModelStatus) -> LoggedModel:
        """Set the model's final status (READY or FAILED)."""
        return logged_model(
            self._gateway.call(
                lambda: self._client.finalize_logged_model(model_id, MlflowStatus[status.value]),
                not_found=ErrorReason.LOGGED_MODEL_NOT_FOUND,
            )
        )

    def set_tags(self, model_id: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags."""
        self._gateway.call(
            lambda: mlflow_internals.set_logged_model_tags(self._client, model_id, dict(tags)),
            not_found=ErrorReason.LOGGED_MODEL_NOT_FOUND,
        )

    def delete_tag(self, model_id: str, key: str) -> None:
        """Delete one tag; a model without it is TAG_NOT_FOUND, a missing model
        LOGGED_MODEL_NOT_FOUND."""
        model = self.get(model_id)
        if key not in model.tags:
            raise NotFoundError(
                f"logged model {model_id} has no tag {key!r}",
                reason=ErrorReason.TAG_NOT_FOUND,
                field="key",
            )
        self._gateway.call(
            lambda: self._client.delete_logged_model_tag(model_id, key),
            not_found=ErrorReason.LOGGED_MODEL_NOT_FOUND,
        )

    def log_outputs(self, run_id: str, outputs: Sequence[tuple[str, int]]) -> None:
        """Record logged models as outputs of the run, each at a step; those the run has
        already at that step are left as they are (MLflow refuses a second record)."""

        def recorded() -> dict[str, int]:
            run = self._client.get_run(run_id)
            if run.info.lifecycle_stage == LifecycleStage.DELETED:
                raise FailedPreconditionError(
                    f"run {run_id} is deleted", reason=ErrorReason.RUN_NOT_ACTIVE
                )
            return {o.model_id: o.step for o in run.outputs.model_outputs} if run.outputs else {}

        def fresh() -> list[LoggedModelOutput]:
            return _new_outputs(run_id, outputs, recorded())

        def op() -> None:
            models = fresh()
            if not models:
                return
            try:
                self._client.log_outputs(run_id, models)
            except Exception:
                # A concurrent repeat may have recorded them first: then this one is done.
                if fresh():
                    raise

        self._gateway.call(op, not_found=ErrorReason.RUN_NOT_FOUND)

    def log_inputs(
        self, run_id: str, datasets: Sequence[DatasetUse], model_ids: Sequence[str]
    ) -> None:
        """Record the datasets and logged models a run used."""
        inputs = [
            DatasetInput(
                Dataset(
                    d.name,
                    d.digest,
                    d.source_type,
                    d.source,
                    schema=d.schema or None,
                    profile=d.profile or None,
                ),
                tags=[InputTag(k, v) for k, v in d.tags.items()],
            )
            for d in datasets
        ]
        models = [LoggedModelInput(model_id) for model_id in model_ids]
        self._gateway.call(
            lambda: self._client.log_inputs(run_id, datasets=inputs or None, models=models or None),
            not_found=ErrorReason.RUN_NOT_FOUND,
        )

    # -- files ----------------------------------------------------------------------------

    def artifact_location(self, model_id: str) -> str:
        """The model's artifact location, once the storage policy allows it."""
        location = self.get(model_id).artifact_location
        return self._gateway.check_storage("model_id", location)

    def log_artifact(self, model_id: str, local_file: Path, artifact_dir: str) -> None:
        """Store one file as `artifact_dir/<the file's name>` among the model's files.
        Retried: storing the same bytes again overwrites them with the same."""
        location = self.artifact_location(model_id)

        def op() -> None:
            self._repository(location).log_artifact(str(local_file), artifact_dir or None)

        self._gateway.call(op)

    def list_artifacts(self, model_id: str, path: str) -> list[domain.FileInfo]:
        """The model's files directly under `path` (empty: the root)."""
        location = self.artifact_location(model_id)
        infos: Any = self._gateway.call(
            lambda: self._repository(location).list_artifacts(path or None)
        )
        return [
            domain.FileInfo(path=i.path, is_dir=bool(i.is_dir), size_bytes=int(i.file_size or 0))
            for i in infos
        ]

    def _repository(self, location: str) -> Any:
        # Built with the sidecar's own tracking URI: MLflow's default one is the
        # process's, which is not necessarily the sidecar's MLflow.
        return get_artifact_repository(
            location,
            tracking_uri=self._gateway.tracking_uri,
            registry_uri=self._gateway.registry_uri,
        )

    def download_artifact(self, model_id: str, artifact_path: str, dst_dir: Path) -> Path:
        """Download one of the model's files into `dst_dir`; returns its path."""
        location = self.artifact_location(model_id)

        def op() -> str:
            return mlflow_internals.download_artifacts(
                self._repository(location), artifact_path, str(dst_dir)
            )

        return Path(self._gateway.call(op, not_found=ErrorReason.ARTIFACT_NOT_FOUND))
