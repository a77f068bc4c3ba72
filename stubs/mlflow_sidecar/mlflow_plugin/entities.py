"""The typed client's domain types as MLflow's entities, and back.

A run's artifact URI is rewritten to `<sidecar root>/runs/<run id>/artifacts`: MLflow
picks an artifact repository by the scheme of that URI, and the sidecar's own artifact
repository is the one that reaches the run's artifacts from a trainer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mlflow.entities import (
    Dataset,
    DatasetInput,
    ExperimentTag,
    InputTag,
    LoggedModelInput,
    LoggedModelOutput,
    Param,
    RunData,
    RunInputs,
    RunOutputs,
    RunTag,
)
from mlflow.entities import (
    Experiment as MlflowExperiment,
)
from mlflow.entities import (
    FileInfo as MlflowFileInfo,
)
from mlflow.entities import LoggedModel as MlflowLoggedModel
from mlflow.entities import LoggedModelStatus as MlflowLoggedModelStatus
from mlflow.entities import (
    Metric as MlflowMetric,
)
from mlflow.entities import (
    Run as MlflowRun,
)
from mlflow.entities import (
    RunInfo as MlflowRunInfo,
)
from mlflow.entities import (
    ViewType as MlflowViewType,
)
from mlflow.entities.model_registry import (
    ModelVersion as MlflowModelVersion,
)
from mlflow.entities.model_registry import (
    ModelVersionTag,
    RegisteredModelAlias,
    RegisteredModelTag,
)
from mlflow.entities.model_registry import (
    RegisteredModel as MlflowRegisteredModel,
)

from mlflow_sidecar.core.domain import (
    Experiment,
    FileInfo,
    Metric,
    ModelVersion,
    RegisteredModel,
    Run,
    RunInfo,
    ViewType,
)
from mlflow_sidecar.core.logged_models import LoggedModel

_VIEW_TYPES = {
    MlflowViewType.ACTIVE_ONLY: ViewType.ACTIVE_ONLY,
    MlflowViewType.DELETED_ONLY: ViewType.DELETED_ONLY,
    MlflowViewType.ALL: ViewType.ALL,
}


def view_type(mlflow_view_type: int | None) -> ViewType:
    """MLflow's view type (an int) as the client's; None means active only, as in MLflow."""
    if mlflow_view_type is None:
        return ViewType.ACTIVE_ONLY
    return _VIEW_TYPES[mlflow_view_type]


def run_artifact_uri(root: str, run_id: str) -> str:
    """The artifact URI a trainer sees for a run: served by the sidecar's artifact repository."""
    return f"{root}/runs/{run_id}/artifacts"


def model_artifact_uri(root: str, model_id: str) -> str:
    """The artifact location a trainer sees for a logged model (the sidecar's repository)."""
    return f"{root}/models/{model_id}/artifacts"


def logged_model(value: LoggedModel, root: str) -> MlflowLoggedModel:
    """A logged model as MLflow's entity, its artifact location the sidecar's."""
    return MlflowLoggedModel(
        experiment_id=value.experiment_id,
        model_id=value.model_id,
        name=value.name,
        artifact_location=model_artifact_uri(root, value.model_id),
        creation_timestamp=value.creation_time_ms,
        last_updated_timestamp=value.last_updated_time_ms,
        model_type=value.model_type or None,
        source_run_id=value.source_run_id or None,
        status=MlflowLoggedModelStatus[value.status.value],
        status_message=value.status_message or None,
        tags=dict(value.tags),
        params=dict(value.params),
        # The sidecar carries no model metrics (the metric stream drops a point's link to
        # its model); MLflow's models read a list, empty without any, never None.
        metrics=[],
    )


def experiment(value: Experiment) -> MlflowExperiment:
    """An experiment as MLflow's entity."""
    return MlflowExperiment(
        experiment_id=value.experiment_id,
        name=value.name,
        artifact_location=value.artifact_location,
        lifecycle_stage=value.lifecycle_stage.value,
        tags=[ExperimentTag(k, v) for k, v in value.tags.items()],
        creation_time=value.creation_time_ms or None,
        last_update_time=value.last_update_time_ms or None,
    )


def run_info(value: RunInfo, root: str) -> MlflowRunInfo:
    """A run's info as MLflow's entity, its artifact URI the sidecar's (see above)."""
    return MlflowRunInfo(
        run_id=value.run_id,
        experiment_id=value.experiment_id,
        user_id=value.user_id,
        status=value.status.value,
        start_time=value.start_time_ms,
        end_time=value.end_time_ms or None,
        lifecycle_stage=value.lifecycle_stage.value,
        artifact_uri=run_artifact_uri(root, value.run_id),
        run_name=value.run_name,
    )


def metric(value: Metric) -> MlflowMetric:
    """A metric point as MLflow's entity."""
    return MlflowMetric(value.key, value.value, value.timestamp_ms, value.step)


def run(value: Run, root: str) -> MlflowRun:
    """A run with its latest metrics, params and tags as MLflow's entity."""
    data = RunData(
        metrics=[metric(m) for m in value.metrics.values()],
        params=[Param(k, v) for k, v in value.params.items()],
        tags=[RunTag(k, v) for k, v in value.tags.items()],
    )
    inputs = RunInputs(
        dataset_inputs=[
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
            for d in value.dataset_inputs
        ],
        model_inputs=[LoggedModelInput(m) for m in value.model_inputs],
    )
    outputs = RunOutputs([LoggedModelOutput(m, step) for m, step in value.model_outputs])
    return MlflowRun(run_info(value.info, root), data, inputs, outputs)


def file_info(value: FileInfo, path: str) -> MlflowFileInfo:
    """An artifact listing entry as MLflow's, `path` relative to the repository's root."""
    return MlflowFileInfo(path, value.is_dir, None if value.is_dir else value.size_bytes)


def registered_model(
    value: RegisteredModel, latest: Iterable[MlflowModelVersion] = ()
) -> MlflowRegisteredModel:
    """A registered model as MLflow's entity."""
    return MlflowRegisteredModel(
        name=value.name,
        creation_timestamp=value.creation_time_ms,
        last_updated_timestamp=value.last_updated_time_ms,
        description=value.description,
        latest_versions=list(latest),
        tags=[RegisteredModelTag(k, v) for k, v in value.tags.items()],
        aliases=[RegisteredModelAlias(a, str(v)) for a, v in value.aliases.items()],
    )


def model_version(value: ModelVersion) -> MlflowModelVersion:
    """A model version as MLflow's entity; its stage is "None" (aliases replace stages)."""
    return MlflowModelVersion(
        name=value.name,
        version=str(value.version),
        creation_timestamp=value.creation_time_ms,
        last_updated_timestamp=value.last_updated_time_ms,
        description=value.description,
        user_id=value.user_id,
        current_stage="None",
        source=value.source,
        run_id=value.run_id or None,
        status=value.status.value,
        status_message=value.status_message,
        tags=[ModelVersionTag(k, v) for k, v in value.tags.items()],
        aliases=list(value.aliases),
        model_id=value.model_id or None,
    )


def tag_dict(tags: Iterable[object] | Mapping[str, str] | None) -> dict[str, str]:
    """MLflow's tags (a list of tag entities, or a dict) as a plain dict."""
    if tags is None:
        return {}
    if isinstance(tags, Mapping):
        return {str(k): str(v) for k, v in tags.items()}
    return {str(getattr(t, "key")): str(getattr(t, "value")) for t in tags}  # noqa: B009
