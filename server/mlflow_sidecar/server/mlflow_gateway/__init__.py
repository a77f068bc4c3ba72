"""The one package that imports mlflow: every MLflow call of the sidecar goes through here."""

from mlflow_sidecar.server.mlflow_gateway.gateway import MlflowGateway

__all__ = ["MlflowGateway"]
