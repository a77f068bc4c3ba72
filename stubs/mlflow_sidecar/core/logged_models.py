"""MLflow 3's logged models: the domain type shared by client and server, and its messages."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow_sidecar.core.domain import DatasetUse
from mlflow_sidecar.v1 import tracking_pb2 as pb

__all__ = [
    "DatasetUse",  # defined with the other domain types; logged-model code imports it here
    "LoggedModel",
    "LoggedModelStatus",
    "dataset_from_pb",
    "dataset_to_pb",
    "logged_model_from_pb",
    "logged_model_to_pb",
    "status_from_pb",
    "status_to_pb",
]


class LoggedModelStatus(enum.Enum):
    """Whether a logged model's files are complete, as MLflow names it."""

    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class LoggedModel:
    """A model logged to an experiment (MLflow 3), with its own artifact location."""

    model_id: str
    experiment_id: str
    name: str
    artifact_location: str = ""
    creation_time_ms: int = 0
    last_updated_time_ms: int = 0
    model_type: str = ""
    source_run_id: str = ""
    status: LoggedModelStatus = LoggedModelStatus.PENDING
    status_message: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)


def dataset_to_pb(dataset: DatasetUse) -> pb.DatasetInput:
    """Domain dataset use to message."""
    return pb.DatasetInput(
        name=dataset.name,
        digest=dataset.digest,
        source_type=dataset.source_type,
        source=dataset.source,
        schema=dataset.schema,
        profile=dataset.profile,
        tags=dict(dataset.tags),
    )


def dataset_from_pb(msg: pb.DatasetInput) -> DatasetUse:
    """Message to domain dataset use."""
    return DatasetUse(
        name=msg.name,
        digest=msg.digest,
        source_type=msg.source_type,
        source=msg.source,
        schema=msg.schema,
        profile=msg.profile,
        tags=dict(msg.tags),
    )


_STATUS_TO_PB = {
    LoggedModelStatus.PENDING: pb.LOGGED_MODEL_STATUS_PENDING,
    LoggedModelStatus.READY: pb.LOGGED_MODEL_STATUS_READY,
    LoggedModelStatus.FAILED: pb.LOGGED_MODEL_STATUS_FAILED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def status_to_pb(status: LoggedModelStatus) -> pb.LoggedModelStatus.ValueType:
    """Domain status to its enum value."""
    return _STATUS_TO_PB[status]


def status_from_pb(value: pb.LoggedModelStatus.ValueType) -> LoggedModelStatus | None:
    """Enum value to domain status; None for UNSPECIFIED or a value this version lacks."""
    return _STATUS_FROM_PB.get(value)


def logged_model_to_pb(model: LoggedModel) -> pb.LoggedModel:
    """Domain logged model to message."""
    return pb.LoggedModel(
        model_id=model.model_id,
        experiment_id=model.experiment_id,
        name=model.name,
        artifact_location=model.artifact_location,
        creation_time_ms=model.creation_time_ms,
        last_updated_time_ms=model.last_updated_time_ms,
        model_type=model.model_type,
        source_run_id=model.source_run_id,
        status=status_to_pb(model.status),
        status_message=model.status_message,
        tags=dict(model.tags),
        params=dict(model.params),
    )


def logged_model_from_pb(msg: pb.LoggedModel) -> LoggedModel:
    """Message to domain logged model."""
    return LoggedModel(
        model_id=msg.model_id,
        experiment_id=msg.experiment_id,
        name=msg.name,
        artifact_location=msg.artifact_location,
        creation_time_ms=msg.creation_time_ms,
        last_updated_time_ms=msg.last_updated_time_ms,
        model_type=msg.model_type,
        source_run_id=msg.source_run_id,
        status=status_from_pb(msg.status) or LoggedModelStatus.PENDING,
        status_message=msg.status_message,
        tags=dict(msg.tags),
        params=dict(msg.params),
    )
