"""`ServerContainer`: wires config -> gateway, spool -> services -> servicers -> server."""

from __future__ import annotations

import functools

from dependency_injector import containers, providers

from mlflow_sidecar.server.alias_watch import AliasWatchHub
from mlflow_sidecar.server.artifact_writers import ArtifactWriters
from mlflow_sidecar.server.config import AppConfig
from mlflow_sidecar.server.grpc_server import SidecarServer
from mlflow_sidecar.server.idempotency import RequestLedger
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway
from mlflow_sidecar.server.mlflow_gateway.logged_models import LoggedModelGateway
from mlflow_sidecar.server.model_cache import ModelCache
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.servicers.registry import RegistryServicer
from mlflow_sidecar.server.servicers.tracking import TrackingServicer
from mlflow_sidecar.server.services.alias_watch import AliasWatchService
from mlflow_sidecar.server.services.artifact_transfers import ArtifactTransfers
from mlflow_sidecar.server.services.logged_models import LoggedModelService
from mlflow_sidecar.server.services.metric_ingest import MetricIngest
from mlflow_sidecar.server.services.model_downloads import ModelDownloads
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.services.tracking import TrackingService
from mlflow_sidecar.server.spool.deliverer import MetricDeliverer
from mlflow_sidecar.server.spool.store import SpoolStore
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.server.stream_shutdown import StreamShutdown
from mlflow_sidecar.server.tracing import tracing_from_env


class ServerContainer(containers.DeclarativeContainer):
    """Everything the sidecar process is made of; build it with `ServerContainer(config=cfg)`."""

    config = providers.Dependency(instance_of=AppConfig)
    metrics = providers.Singleton(SidecarMetrics)
    # None unless the OTEL_* variables turn tracing on.
    tracing = providers.Singleton(tracing_from_env)
    gateway = providers.Singleton(MlflowGateway, config, metrics)
    staging = providers.Singleton(Staging, config, metrics)
    request_ledger = providers.Singleton(
        RequestLedger,
        config.provided.requests_path,
        retention_s=config.provided.requests.retention_s,
    )

    spool_store = providers.Singleton(
        SpoolStore,
        config.provided.spool_path,
        max_points=config.provided.spool.max_points,
        synchronous=config.provided.spool.synchronous,
        chunk_points=config.provided.spool.batch_size,
        min_free_bytes=config.provided.spool.min_free_bytes,
    )
    deliverer = providers.Singleton(
        MetricDeliverer,
        spool_store,
        # One try per send: the deliverer's workers back off together instead.
        providers.Callable(functools.partial, gateway.provided.log_metrics, retry=False),
        batch_size=config.provided.spool.batch_size,
        backoff_factor_s=config.provided.retry.factor_s,
        max_backoff_s=config.provided.retry.max_backoff_s,
        workers=config.provided.spool.delivery_workers,
        metrics=metrics,
        end_run=gateway.provided.end_run,
    )
    metric_ingest = providers.Singleton(
        MetricIngest, spool_store, deliverer, config.provided.spool.flush_timeout_s, metrics
    )

    tracking_service = providers.Singleton(TrackingService, gateway, metric_ingest, staging)
    # Every service that stores artifact files shares it: one writer per path at a time.
    artifact_writers = providers.Singleton(ArtifactWriters)
    registry_service = providers.Singleton(
        RegistryService, gateway, staging, ledger=request_ledger, writers=artifact_writers
    )
    model_cache = providers.Singleton(
        ModelCache,
        config.provided.model_cache_dir,
        config.provided.model_cache.max_bytes,
        chunk_bytes=config.provided.artifacts.chunk_bytes,
        metrics=metrics,
    )
    model_downloads = providers.Singleton(
        ModelDownloads,
        registry_service,
        gateway,
        model_cache,
        staging,
        scope=config.provided.model_cache_scope,
        metrics=metrics,
    )
    artifact_transfers = providers.Singleton(ArtifactTransfers, gateway, staging, artifact_writers)
    logged_model_service = providers.Singleton(
        LoggedModelService,
        providers.Singleton(LoggedModelGateway, gateway),
        staging,
        artifact_writers,
    )
    stream_shutdown = providers.Singleton(StreamShutdown)
    tracking_servicer = providers.Singleton(
        TrackingServicer,
        tracking_service,
        artifact_transfers,
        staging,
        logged_model_service,
        ledger=request_ledger,
        shutdown=stream_shutdown,
    )
    alias_watch_hub = providers.Singleton(AliasWatchHub, gateway, config.provided.watch, metrics)
    alias_watch_service = providers.Singleton(AliasWatchService, alias_watch_hub)
    registry_servicer = providers.Singleton(
        RegistryServicer, registry_service, staging, model_downloads, alias_watch_service
    )
    server = providers.Singleton(
        SidecarServer,
        config,
        tracking_servicer,
        registry_servicer,
        background=providers.List(gateway.provided.late_writes, deliverer),
        metrics=metrics,
        ledger=request_ledger,
        drain=deliverer,
        mlflow_ping=providers.Callable(functools.partial, gateway.provided.ping, retry=False),
        spool=spool_store,
        tracing=tracing,
        open_streams=providers.List(alias_watch_hub, stream_shutdown),
    )
