"""The one package that imports mlflow: every MLflow call of the sidecar goes through here.

`MlflowPort` (the seam the services depend on) imports no MLflow; `MlflowGateway` (its
implementation) is imported on first use, so that depending on the port stays cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlflow_sidecar.server.mlflow_gateway.port import MlflowPort

if TYPE_CHECKING:
    from mlflow_sidecar.server.mlflow_gateway.gateway import MlflowGateway

__all__ = ["MlflowGateway", "MlflowPort"]


def __getattr__(name: str) -> Any:
    if name == "MlflowGateway":
        from mlflow_sidecar.server.mlflow_gateway.gateway import MlflowGateway

        return MlflowGateway
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
