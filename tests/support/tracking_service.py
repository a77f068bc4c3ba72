"""A TrackingService over a fake MLflow and a real spool, for unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.services.metric_ingest import MetricIngest
from mlflow_sidecar.server.services.tracking import TrackingService
from mlflow_sidecar.server.spool.deliverer import MetricDeliverer
from mlflow_sidecar.server.spool.store import SpoolStore
from mlflow_sidecar.server.staging import Staging
from tests.fakes.mlflow_port import FakeMlflow


@contextmanager
def tracking_service_on(
    gateway: FakeMlflow, tmp_path: Path, *, delivering: bool = True, flush_timeout_s: float = 5
) -> Iterator[tuple[TrackingService, Staging]]:
    """The service and its staging area; with `delivering=False` spooled points stay in
    the spool until a test delivers them itself."""
    store = SpoolStore(tmp_path / "spool.db", max_points=10_000)
    deliverer = MetricDeliverer(
        store,
        gateway.log_metrics,
        batch_size=1000,
        backoff_factor_s=0.01,
        max_backoff_s=0.05,
        end_run=gateway.end_run,
    )
    if delivering:
        deliverer.start()
    ingest = MetricIngest(store, deliverer, flush_timeout_s=flush_timeout_s)
    staging = Staging(load_config(data_dir=tmp_path / "data"))
    try:
        yield TrackingService(gateway, ingest, staging), staging
    finally:
        if delivering:
            deliverer.stop()
        store.close()
