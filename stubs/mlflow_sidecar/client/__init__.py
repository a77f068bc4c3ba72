"""The trainer-facing half of mlflow-sidecar: ports, domain types, errors, gRPC clients.

Installs without MLflow. Start with `ClientContainer` (see `mlflow_sidecar.client.container`).
"""

from mlflow_sidecar.client.container import ClientContainer, load_env
from mlflow_sidecar.client.domain import (
    ArtifactInfo,
    Experiment,
    FileInfo,
    FlushResult,
    LifecycleStage,
    Metric,
    MetricPoint,
    ModelVersion,
    ModelVersionStatus,
    Page,
    Progress,
    RegisteredModel,
    Run,
    RunInfo,
    RunStatus,
    ViewType,
)
from mlflow_sidecar.client.errors import SidecarError
from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.client.ports import ExperimentTracking, ModelRegistry
from mlflow_sidecar.client.settings import ClientSettings

__all__ = [
    "ArtifactInfo",
    "ClientContainer",
    "ClientSettings",
    "Experiment",
    "ExperimentTracking",
    "FileInfo",
    "FlushResult",
    "LifecycleStage",
    "Metric",
    "MetricPoint",
    "MetricStream",
    "ModelRegistry",
    "ModelVersion",
    "ModelVersionStatus",
    "Page",
    "Progress",
    "RegisteredModel",
    "Run",
    "RunInfo",
    "RunStatus",
    "SidecarError",
    "ViewType",
    "load_env",
]
