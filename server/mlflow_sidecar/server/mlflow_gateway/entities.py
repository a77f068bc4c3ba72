"""MLflow entities -> domain types."""

from __future__ import annotations

from collections.abc import Mapping

from mlflow.entities import Experiment as MlflowExperiment
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Run as MlflowRun
from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
from mlflow.entities.model_registry import RegisteredModel as MlflowRegisteredModel

from mlflow_sidecar.core.domain import (
    Experiment,
    LifecycleStage,
    Metric,
    ModelVersion,
    ModelVersionStatus,
    RegisteredModel,
    Run,
    RunInfo,
    RunStatus,
)
from mlflow_sidecar.core.logged_models import DatasetUse
from mlflow_sidecar.server.mlflow_gateway import mlflow_internals
from mlflow_sidecar.server.mlflow_gateway.sources import source_logged_model_id
from mlflow_sidecar.server.validation import RESERVED_TAG_PREFIX


def user_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    """The tags users set: without the sidecar's own bookkeeping on the entities it
    creates (which request made, renamed or uploaded them; every key with its prefix,
    which callers cannot set), kept in MLflow, where it resolves retries."""
    return {k: v for k, v in (tags or {}).items() if not k.startswith(RESERVED_TAG_PREFIX)}


def text(value: str | None) -> str:
    """MLflow leaves unset strings as None; the domain has "" for them."""
    return value or ""


def ms(value: int | None) -> int:
    """MLflow leaves unset timestamps as None; the domain has 0 for them."""
    return int(value or 0)


def _stage(value: str | None) -> LifecycleStage:
    return LifecycleStage.DELETED if value == "deleted" else LifecycleStage.ACTIVE


def experiment(exp: MlflowExperiment) -> Experiment:
    """MLflow experiment -> domain experiment."""
    return Experiment(
        experiment_id=str(exp.experiment_id),
        name=exp.name,
        artifact_location=exp.artifact_location or "",
        lifecycle_stage=_stage(exp.lifecycle_stage),
        tags=user_tags(exp.tags),
        creation_time_ms=exp.creation_time or 0,
        last_update_time_ms=exp.last_update_time or 0,
    )


def metric(m: MlflowMetric) -> Metric:
    """MLflow metric point -> domain metric point."""
    return Metric(key=m.key, value=float(m.value), timestamp_ms=m.timestamp or 0, step=m.step or 0)


def run(r: MlflowRun) -> Run:
    """MLflow run -> domain run (latest metric values only, as MLflow returns them)."""
    info = r.info
    latest = {m.key: metric(m) for m in (mlflow_internals.metric_objects(r.data) if r.data else [])}
    return Run(
        info=RunInfo(
            run_id=info.run_id,
            experiment_id=str(info.experiment_id),
            run_name=info.run_name or "",
            status=RunStatus(info.status),
            start_time_ms=info.start_time or 0,
            end_time_ms=info.end_time or 0,
            artifact_uri=info.artifact_uri or "",
            lifecycle_stage=_stage(info.lifecycle_stage),
            user_id=info.user_id or "",
        ),
        params=dict(r.data.params) if r.data else {},
        metrics=latest,
        tags=user_tags(r.data.tags) if r.data else {},
        dataset_inputs=tuple(
            DatasetUse(
                name=d.dataset.name,
                digest=d.dataset.digest,
                source_type=d.dataset.source_type,
                source=d.dataset.source,
                schema=d.dataset.schema or "",
                profile=d.dataset.profile or "",
                tags={t.key: t.value for t in d.tags or ()},
            )
            for d in (r.inputs.dataset_inputs if r.inputs else ()) or ()
        ),
        model_inputs=tuple(m.model_id for m in (r.inputs.model_inputs if r.inputs else ()) or ()),
        model_outputs=tuple(
            (m.model_id, int(m.step)) for m in (r.outputs.model_outputs if r.outputs else ()) or ()
        ),
    )


def registered_model(rm: MlflowRegisteredModel) -> RegisteredModel:
    """MLflow registered model -> domain registered model."""
    return RegisteredModel(
        name=rm.name,
        description=rm.description or "",
        creation_time_ms=rm.creation_timestamp or 0,
        last_updated_time_ms=rm.last_updated_timestamp or 0,
        tags=user_tags(rm.tags),
        aliases={alias: int(version) for alias, version in (rm.aliases or {}).items()},
    )


def model_version(mv: MlflowModelVersion) -> ModelVersion:
    """MLflow model version -> domain model version."""
    return ModelVersion(
        name=mv.name,
        version=int(mv.version),
        source=text(mv.source),
        run_id=text(mv.run_id),
        status=ModelVersionStatus(mv.status or "READY"),
        status_message=text(mv.status_message),
        description=text(mv.description),
        tags=user_tags(mv.tags),
        aliases=tuple(mv.aliases or ()),
        creation_time_ms=ms(mv.creation_timestamp),
        last_updated_time_ms=ms(mv.last_updated_timestamp),
        user_id=text(mv.user_id),
        # MLflow's answers can leave a version's model_id unset: a version registered
        # from a logged model's own URI still names that model.
        model_id=text(getattr(mv, "model_id", None)) or source_logged_model_id(text(mv.source)),
    )
