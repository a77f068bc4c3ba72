"""`ServerContainer`: wires config -> gateway -> services -> servicers -> server."""

from __future__ import annotations

from dependency_injector import containers, providers

from mlflow_sidecar.server.config import AppConfig
from mlflow_sidecar.server.grpc_server import SidecarServer
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway
from mlflow_sidecar.server.servicers.registry import RegistryServicer
from mlflow_sidecar.server.servicers.tracking import TrackingServicer
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.services.tracking import TrackingService
from mlflow_sidecar.server.staging import Staging


class ServerContainer(containers.DeclarativeContainer):
    """Everything the sidecar process is made of; build it with `ServerContainer(config=cfg)`."""

    config = providers.Dependency(instance_of=AppConfig)
    gateway = providers.Singleton(MlflowGateway, config)
    staging = providers.Singleton(Staging, config)
    tracking_service = providers.Singleton(TrackingService, gateway, staging)
    registry_service = providers.Singleton(RegistryService, gateway, staging)
    tracking_servicer = providers.Singleton(TrackingServicer, tracking_service, staging)
    registry_servicer = providers.Singleton(RegistryServicer, registry_service, staging)
    server = providers.Singleton(SidecarServer, config, tracking_servicer, registry_servicer)
