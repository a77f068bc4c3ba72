"""Conversions between domain types and protobuf messages, in both directions.

The one place that knows both shapes: the server's servicers and the typed gRPC
clients both use it, so the two sides cannot drift apart.
"""

from __future__ import annotations

from mlflow_sidecar.core.domain import (
    AliasChange,
    AliasChangeKind,
    Experiment,
    FileInfo,
    LifecycleStage,
    Metric,
    MetricPoint,
    ModelVersion,
    ModelVersionStatus,
    RegisteredModel,
    Run,
    RunInfo,
    RunStatus,
    ViewType,
    WatchStatus,
)
from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.core.logged_models import dataset_from_pb, dataset_to_pb
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import tracking_pb2 as pb

# Trailing metadata of StreamMetrics: points of the call committed to the spool.
ACCEPTED_POINTS_METADATA = "accepted-points"
# Initial metadata of StreamMetrics: the forms of a series' integer columns the sidecar
# reads, comma-separated. The typed client sends fixed-width columns once it sees
# SERIES_COLUMNS_FIXED among them; a sidecar without this key reads varints only.
SERIES_COLUMNS_METADATA = "series-columns"
SERIES_COLUMNS_FIXED = "fixed64"
SERIES_COLUMNS_READ = f"varint,{SERIES_COLUMNS_FIXED}"
# Initial metadata of StreamMetrics: the most points one message may hold (the spool's
# size, spool.max_points); a message of more is refused for good (TOO_MANY_POINTS).
MAX_MESSAGE_POINTS_METADATA = "max-message-points"

_STAGE_TO_PB = {
    LifecycleStage.ACTIVE: pb.LIFECYCLE_STAGE_ACTIVE,
    LifecycleStage.DELETED: pb.LIFECYCLE_STAGE_DELETED,
    LifecycleStage.UNKNOWN: pb.LIFECYCLE_STAGE_UNSPECIFIED,
}
_STAGE_FROM_PB = {v: k for k, v in _STAGE_TO_PB.items()}

_VIEW_TO_PB = {
    ViewType.ACTIVE_ONLY: pb.VIEW_TYPE_ACTIVE_ONLY,
    ViewType.DELETED_ONLY: pb.VIEW_TYPE_DELETED_ONLY,
    ViewType.ALL: pb.VIEW_TYPE_ALL,
}
_VIEW_FROM_PB = {v: k for k, v in _VIEW_TO_PB.items()}

_STATUS_TO_PB = {
    RunStatus.RUNNING: pb.RUN_STATUS_RUNNING,
    RunStatus.SCHEDULED: pb.RUN_STATUS_SCHEDULED,
    RunStatus.FINISHED: pb.RUN_STATUS_FINISHED,
    RunStatus.FAILED: pb.RUN_STATUS_FAILED,
    RunStatus.KILLED: pb.RUN_STATUS_KILLED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}

_MV_STATUS_TO_PB = {
    ModelVersionStatus.PENDING_REGISTRATION: reg_pb.MODEL_VERSION_STATUS_PENDING_REGISTRATION,
    ModelVersionStatus.FAILED_REGISTRATION: reg_pb.MODEL_VERSION_STATUS_FAILED_REGISTRATION,
    ModelVersionStatus.READY: reg_pb.MODEL_VERSION_STATUS_READY,
}
_MV_STATUS_FROM_PB = {v: k for k, v in _MV_STATUS_TO_PB.items()}

_CHANGE_KIND_TO_PB = {
    AliasChangeKind.CURRENT: reg_pb.ALIAS_CHANGE_KIND_CURRENT,
    AliasChangeKind.SET: reg_pb.ALIAS_CHANGE_KIND_SET,
    AliasChangeKind.MOVED: reg_pb.ALIAS_CHANGE_KIND_MOVED,
    AliasChangeKind.DELETED: reg_pb.ALIAS_CHANGE_KIND_DELETED,
    AliasChangeKind.VERSION_DELETED: reg_pb.ALIAS_CHANGE_KIND_VERSION_DELETED,
}
_CHANGE_KIND_FROM_PB = {v: k for k, v in _CHANGE_KIND_TO_PB.items()}


def view_type_to_pb(view: ViewType) -> pb.ViewType.ValueType:
    """Domain view type to its enum value."""
    return _VIEW_TO_PB[view]


def view_type_from_pb(value: pb.ViewType.ValueType) -> ViewType:
    """Enum value to the domain view type; UNSPECIFIED means ACTIVE_ONLY. A value this
    contract does not define is INVALID_ARGUMENT on `view_type`."""
    if value == pb.VIEW_TYPE_UNSPECIFIED:
        return ViewType.ACTIVE_ONLY
    known = _VIEW_FROM_PB.get(value)
    if known is None:
        raise InvalidArgumentError("view_type", f"unknown view type {value}")
    return known


def run_status_to_pb(status: RunStatus) -> pb.RunStatus.ValueType:
    """Domain run status to its enum value."""
    return _STATUS_TO_PB[status]


def run_status_from_pb(value: pb.RunStatus.ValueType) -> RunStatus | None:
    """Enum value to the domain run status; None for UNSPECIFIED or unknown values."""
    return _STATUS_FROM_PB.get(value)


def experiment_to_pb(exp: Experiment) -> pb.Experiment:
    """Domain experiment to message."""
    return pb.Experiment(
        experiment_id=exp.experiment_id,
        name=exp.name,
        artifact_location=exp.artifact_location,
        lifecycle_stage=_STAGE_TO_PB[exp.lifecycle_stage],
        tags=dict(exp.tags),
        creation_time_ms=exp.creation_time_ms,
        last_update_time_ms=exp.last_update_time_ms,
    )


def experiment_from_pb(msg: pb.Experiment) -> Experiment:
    """Message to domain experiment."""
    return Experiment(
        experiment_id=msg.experiment_id,
        name=msg.name,
        artifact_location=msg.artifact_location,
        lifecycle_stage=_STAGE_FROM_PB.get(msg.lifecycle_stage, LifecycleStage.ACTIVE),
        tags=dict(msg.tags),
        creation_time_ms=msg.creation_time_ms,
        last_update_time_ms=msg.last_update_time_ms,
    )


def metric_to_pb(metric: Metric) -> pb.Metric:
    """Domain metric point to message."""
    return pb.Metric(
        key=metric.key, value=metric.value, timestamp_ms=metric.timestamp_ms, step=metric.step
    )


def metric_from_pb(msg: pb.Metric) -> Metric:
    """Message to domain metric point."""
    return Metric(key=msg.key, value=msg.value, timestamp_ms=msg.timestamp_ms, step=msg.step)


def metric_point_to_pb(point: MetricPoint) -> pb.MetricPoint:
    """Domain run-addressed point to message."""
    return pb.MetricPoint(
        run_id=point.run_id,
        key=point.key,
        value=point.value,
        timestamp_ms=point.timestamp_ms,
        step=point.step,
    )


def run_to_pb(run: Run) -> pb.Run:
    """Domain run to message."""
    info = run.info
    return pb.Run(
        info=pb.RunInfo(
            run_id=info.run_id,
            run_name=info.run_name,
            experiment_id=info.experiment_id,
            status=_STATUS_TO_PB[info.status],
            start_time_ms=info.start_time_ms,
            end_time_ms=info.end_time_ms,
            artifact_uri=info.artifact_uri,
            lifecycle_stage=_STAGE_TO_PB[info.lifecycle_stage],
            user_id=info.user_id,
        ),
        data=pb.RunData(
            params=dict(run.params),
            metrics=[metric_to_pb(m) for m in run.metrics.values()],
            tags=dict(run.tags),
        ),
        inputs=pb.RunInputs(
            datasets=[dataset_to_pb(d) for d in run.dataset_inputs],
            model_ids=list(run.model_inputs),
        ),
        outputs=pb.RunOutputs(
            models=[pb.ModelOutput(model_id=m, step=s) for m, s in run.model_outputs]
        ),
    )


def run_from_pb(msg: pb.Run) -> Run:
    """Message to domain run."""
    info = msg.info
    return Run(
        info=RunInfo(
            run_id=info.run_id,
            experiment_id=info.experiment_id,
            run_name=info.run_name,
            status=_STATUS_FROM_PB.get(info.status, RunStatus.RUNNING),
            start_time_ms=info.start_time_ms,
            end_time_ms=info.end_time_ms,
            artifact_uri=info.artifact_uri,
            lifecycle_stage=_STAGE_FROM_PB.get(info.lifecycle_stage, LifecycleStage.ACTIVE),
            user_id=info.user_id,
        ),
        params=dict(msg.data.params),
        metrics={m.key: metric_from_pb(m) for m in msg.data.metrics},
        tags=dict(msg.data.tags),
        dataset_inputs=tuple(dataset_from_pb(d) for d in msg.inputs.datasets),
        model_inputs=tuple(msg.inputs.model_ids),
        model_outputs=tuple((m.model_id, m.step) for m in msg.outputs.models),
    )


def registered_model_to_pb(model: RegisteredModel) -> reg_pb.RegisteredModel:
    """Domain registered model to message."""
    return reg_pb.RegisteredModel(
        name=model.name,
        description=model.description,
        creation_time_ms=model.creation_time_ms,
        last_updated_time_ms=model.last_updated_time_ms,
        tags=dict(model.tags),
        aliases=dict(model.aliases),
    )


def registered_model_from_pb(msg: reg_pb.RegisteredModel) -> RegisteredModel:
    """Message to domain registered model."""
    return RegisteredModel(
        name=msg.name,
        description=msg.description,
        creation_time_ms=msg.creation_time_ms,
        last_updated_time_ms=msg.last_updated_time_ms,
        tags=dict(msg.tags),
        aliases=dict(msg.aliases),
    )


def model_version_to_pb(mv: ModelVersion) -> reg_pb.ModelVersion:
    """Domain model version to message."""
    return reg_pb.ModelVersion(
        name=mv.name,
        version=mv.version,
        creation_time_ms=mv.creation_time_ms,
        last_updated_time_ms=mv.last_updated_time_ms,
        description=mv.description,
        source=mv.source,
        run_id=mv.run_id,
        status=_MV_STATUS_TO_PB[mv.status],
        status_message=mv.status_message,
        tags=dict(mv.tags),
        aliases=list(mv.aliases),
        user_id=mv.user_id,
        model_id=mv.model_id,
    )


def model_version_from_pb(msg: reg_pb.ModelVersion) -> ModelVersion:
    """Message to domain model version."""
    return ModelVersion(
        name=msg.name,
        version=msg.version,
        source=msg.source,
        run_id=msg.run_id,
        status=_MV_STATUS_FROM_PB.get(msg.status, ModelVersionStatus.READY),
        status_message=msg.status_message,
        description=msg.description,
        tags=dict(msg.tags),
        aliases=tuple(msg.aliases),
        creation_time_ms=msg.creation_time_ms,
        last_updated_time_ms=msg.last_updated_time_ms,
        user_id=msg.user_id,
        model_id=msg.model_id,
    )


def file_info_to_pb(info: FileInfo) -> pb.FileInfo:
    """Domain artifact listing entry to message."""
    return pb.FileInfo(path=info.path, is_dir=info.is_dir, size_bytes=info.size_bytes)


def file_info_from_pb(msg: pb.FileInfo) -> FileInfo:
    """Message to domain artifact listing entry."""
    return FileInfo(path=msg.path, is_dir=msg.is_dir, size_bytes=msg.size_bytes)


def alias_change_to_pb(change: AliasChange) -> reg_pb.AliasChange:
    """Domain alias change to message."""
    msg = reg_pb.AliasChange(
        alias=change.alias,
        kind=_CHANGE_KIND_TO_PB[change.kind],
        previous_version=change.previous_version,
    )
    if change.model_version is not None:
        msg.model_version.CopyFrom(model_version_to_pb(change.model_version))
    return msg


def alias_change_from_pb(msg: reg_pb.AliasChange) -> AliasChange | None:
    """Message to domain alias change; None for a kind this client does not know (a newer
    sidecar's), which it cannot act on."""
    kind = _CHANGE_KIND_FROM_PB.get(msg.kind)
    if kind is None:
        return None
    return AliasChange(
        alias=msg.alias,
        kind=kind,
        model_version=model_version_from_pb(msg.model_version)
        if msg.HasField("model_version")
        else None,
        previous_version=msg.previous_version,
    )


def watch_status_to_pb(status: WatchStatus) -> reg_pb.WatchStatus:
    """Domain watch status to message."""
    return reg_pb.WatchStatus(
        mlflow_reachable=status.mlflow_reachable,
        last_poll_time_ms=status.last_poll_time_ms,
        message=status.message,
    )


def watch_status_from_pb(msg: reg_pb.WatchStatus) -> WatchStatus:
    """Message to domain watch status."""
    return WatchStatus(
        mlflow_reachable=msg.mlflow_reachable,
        last_poll_time_ms=msg.last_poll_time_ms,
        message=msg.message,
    )
