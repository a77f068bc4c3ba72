"""`ClientContainer`: what a trainer asks for `experiment_tracking()` and `model_registry()`.

    container = ClientContainer()
    container.config.from_dict({"target": "127.0.0.1:50051"})   # or load_env(container)
    tracking = container.experiment_tracking()

A host application composes it into its own container with
`sidecar = providers.Container(ClientContainer, config=config.sidecar)` and can
override any provider (e.g. `experiment_tracking`) with a fake in its tests.
"""

from __future__ import annotations

from dependency_injector import containers, providers
from mlflow_sidecar.client.channel import open_channel
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2_grpc
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseModel):
    """How a trainer reaches its sidecar."""

    target: str = "127.0.0.1:50051"
    timeout_s: float = Field(30.0, gt=0, description="default deadline of every call")
    max_attempts: int = Field(5, ge=1, le=5, description="tries of a call that got UNAVAILABLE")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    tls: bool = False
    token: str = Field("", description="bearer token sent as `authorization` metadata")


class ClientEnvSettings(ClientSettings, BaseSettings):
    """`ClientSettings` read from `MLFLOW_SIDECAR_CLIENT_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MLFLOW_SIDECAR_CLIENT_")


class ClientContainer(containers.DeclarativeContainer):
    """Channel, stubs and typed clients of one sidecar."""

    config = providers.Configuration(default=ClientSettings().model_dump())

    channel = providers.Resource(
        open_channel,
        target=config.target,
        max_message_bytes=config.max_message_bytes.as_int(),
        max_attempts=config.max_attempts.as_int(),
        tls=config.tls,
        token=config.token,
    )
    tracking_stub = providers.Singleton(tracking_pb2_grpc.ExperimentTrackingServiceStub, channel)
    registry_stub = providers.Singleton(registry_pb2_grpc.ModelRegistryServiceStub, channel)
    experiment_tracking = providers.Singleton(
        GrpcExperimentTracking, stub=tracking_stub, timeout_s=config.timeout_s.as_float()
    )
    model_registry = providers.Singleton(
        GrpcModelRegistry, stub=registry_stub, timeout_s=config.timeout_s.as_float()
    )


def load_env(container: ClientContainer) -> None:
    """Fill the container's config from `MLFLOW_SIDECAR_CLIENT_TARGET`, `..._TIMEOUT_S`, etc."""
    container.config.from_dict(ClientEnvSettings().model_dump())
