"""`ClientContainer`: what a trainer asks for `experiment_tracking()` and `model_registry()`.

    container = ClientContainer()
    container.config.from_dict({"target": "127.0.0.1:50051"})   # or load_env(container)
    tracking = container.experiment_tracking()

The channel stays open as long as any client the container handed out is alive (dropping
the container closes nothing a client still uses); `shutdown_resources()` closes it, after
which calls on its clients raise FailedPreconditionError (reason CLIENT_CLOSED).

A host application composes it into its own container with
`sidecar = providers.Container(ClientContainer, config=config.sidecar)` and can
override any provider (e.g. `experiment_tracking`) with a fake in its tests.
"""

from __future__ import annotations

from dependency_injector import containers, providers, resources

from mlflow_sidecar.client.channel import SharedChannel
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.client.settings import ClientEnvSettings, ClientSettings
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2_grpc


class SharedChannelResource(resources.Resource[SharedChannel]):
    """The container's channel: closed by `shutdown_resources()`, never by garbage
    collection of the container, as the clients it handed out may outlive it."""

    def init(self, channel: SharedChannel) -> SharedChannel:
        # The channel itself comes from a thread-safe singleton: a Resource initialises
        # without a lock, so threads asking at once each opened a channel of their own,
        # and shutdown_resources() closed only the last one.
        return channel

    def shutdown(self, resource: SharedChannel | None) -> None:
        if resource is not None:
            resource.close()


class ClientContainer(containers.DeclarativeContainer):
    """Channel, stubs and typed clients of one sidecar.

    Safe to use from several threads at once, first use included: every thread gets the
    same clients, made from the one channel that `shutdown_resources()` closes."""

    config = providers.Configuration(default=ClientSettings().model_dump())
    # Validated settings; keys a host's config leaves unset take their defaults.
    settings = providers.ThreadSafeSingleton(ClientSettings.from_mapping, config)

    opened_channel = providers.ThreadSafeSingleton(SharedChannel, settings)
    shared_channel = providers.Resource(SharedChannelResource, opened_channel)
    # The grpc.Channel every stub is made from; the stubs keep it open (see SharedChannel).
    channel = shared_channel.provided.channel
    tracking_stub = providers.ThreadSafeSingleton(
        tracking_pb2_grpc.ExperimentTrackingServiceStub, channel
    )
    registry_stub = providers.ThreadSafeSingleton(
        registry_pb2_grpc.ModelRegistryServiceStub, channel
    )
    experiment_tracking = providers.ThreadSafeSingleton(
        GrpcExperimentTracking,
        stub=tracking_stub,
        timeout_s=settings.provided.timeout_s,
        transfer_timeout_s=settings.provided.transfer_timeout_s,
        chunk_bytes=settings.provided.upload_chunk_bytes,
        download_chunk_bytes=settings.provided.download_chunk_bytes,
        upload_attempts=settings.provided.max_attempts,
        reconnect=shared_channel.provided.reconnect,
    )
    metric_stream = providers.Factory(
        MetricStream,
        tracking_stub,
        max_message_bytes=settings.provided.metric_message_bytes,
        max_buffered_points=settings.provided.stream_buffer_points,
        when_full=settings.provided.stream_when_full,
        retry_budget_s=settings.provided.stream_reconnect_s,
    )
    model_registry = providers.ThreadSafeSingleton(
        GrpcModelRegistry,
        stub=registry_stub,
        timeout_s=settings.provided.timeout_s,
        transfer_timeout_s=settings.provided.transfer_timeout_s,
        chunk_bytes=settings.provided.upload_chunk_bytes,
        download_chunk_bytes=settings.provided.download_chunk_bytes,
        upload_attempts=settings.provided.max_attempts,
        reconnect=shared_channel.provided.reconnect,
        watch_reconnect_s=settings.provided.stream_reconnect_s,
        shared_cache_dir=settings.provided.model_cache_dir,
    )


def load_env(container: ClientContainer) -> None:
    """Set the container's config from `MLFLOW_SIDECAR_CLIENT_TARGET`, `..._TIMEOUT_S`, etc.

    Only the settings the environment names are written: the rest keep what the config
    held (a value from `config.from_dict()`, or the default). Each value is checked here;
    how they go with the config's others (a CA file needs `tls`) is checked once the
    container builds its settings from them all."""
    container.config.from_dict(ClientEnvSettings().model_dump(exclude_unset=True))
