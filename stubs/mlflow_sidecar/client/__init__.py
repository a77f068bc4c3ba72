"""The trainer-facing half of mlflow-sidecar: ports, domain types, errors, gRPC clients.

Installs without MLflow. Start with `ClientContainer` (see `mlflow_sidecar.client.container`).
The trainer ports live in `mlflow_sidecar.client.ports`; the domain types and errors in
`mlflow_sidecar.core`, shared with the sidecar. All are re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.client.ports import AliasWatch, ExperimentTracking, ModelRegistry
from mlflow_sidecar.client.settings import ClientSettings
from mlflow_sidecar.core.domain import (
    AliasChange,
    AliasChangeKind,
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
    SyncedModel,
    ViewType,
    WatchStatus,
)
from mlflow_sidecar.core.errors import SidecarError

if TYPE_CHECKING:
    from mlflow_sidecar.client.container import ClientContainer, load_env

__all__ = [
    "AliasChange",
    "AliasChangeKind",
    "AliasWatch",
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
    "SyncedModel",
    "ViewType",
    "WatchStatus",
    "load_env",
]

# dependency-injector takes most of a second to import; code that only needs the domain
# types, the errors or a gRPC client should not pay for it, so the container is imported
# on first use.
_LAZY = frozenset({"ClientContainer", "load_env"})


def __getattr__(name: str) -> Any:
    """Import `ClientContainer` and `load_env` (and dependency-injector) on first use."""
    if name in _LAZY:
        from mlflow_sidecar.client import container

        value: Any = getattr(container, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
