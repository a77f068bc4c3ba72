"""Prometheus metrics and log formatting.

Each sidecar owns its registry (several can live in one process, as in tests) and
serves it on its own HTTP port when `metrics.port` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pythonjsonlogger.json import JsonFormatter

from mlflow_sidecar.server.request_context import request_id

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class SpoolGauges(Collector):
    """Reads the spool's depth at scrape time, so the numbers are never stale."""

    def __init__(self, read: Callable[[], tuple[int, float, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending, oldest_age_s, dead = self._read()
        yield GaugeMetricFamily(
            "mlflow_sidecar_spool_pending_points", "Points waiting for delivery", value=pending
        )
        yield GaugeMetricFamily(
            "mlflow_sidecar_spool_oldest_age_seconds",
            "Age of the oldest undelivered point",
            value=oldest_age_s,
        )
        yield GaugeMetricFamily(
            "mlflow_sidecar_spool_dead_letter_points", "Points MLflow refused for good", value=dead
        )


class SidecarMetrics:
    """Every Prometheus series of one sidecar."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_total = Counter(
            "mlflow_sidecar_rpc", "RPCs served", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "mlflow_sidecar_rpc_duration_seconds",
            "RPC latency",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.mlflow_seconds = Histogram(
            "mlflow_sidecar_mlflow_call_duration_seconds",
            "Latency of one MLflow call, retries included",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.mlflow_retries = Counter(
            "mlflow_sidecar_mlflow_retries", "Retries of transient MLflow failures", registry=r
        )
        self.points_accepted = Counter(
            "mlflow_sidecar_metric_points_accepted", "Points committed to the spool", registry=r
        )
        self.points_delivered = Counter(
            "mlflow_sidecar_metric_points_delivered", "Points MLflow confirmed", registry=r
        )
        self.stream_bytes = Counter(
            "mlflow_sidecar_stream_bytes",
            "Bytes of artifacts and models streamed",
            ["direction"],
            registry=r,
        )
        for direction in ("upload", "download"):
            self.stream_bytes.labels(direction)

    def watch_spool(self, read: Callable[[], tuple[int, float, int]]) -> None:
        """Publish the spool's depth, oldest age and dead letters."""
        self.registry.register(SpoolGauges(read))

    def serve(
        self,
        host: str,
        port: int,
        *,
        cert_file: str | None = None,
        key_file: str | None = None,
        client_ca_file: str | None = None,
    ) -> int:
        """Serve /metrics on host:port (HTTPS with `cert_file`/`key_file`, and client
        certificates required with `client_ca_file`); returns the bound port."""
        server, _thread = start_http_server(
            port,
            addr=host,
            registry=self.registry,
            certfile=cert_file,
            keyfile=key_file,
            client_cafile=client_ca_file,
            client_auth_required=client_ca_file is not None,
        )
        return int(server.server_port)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str, fmt: str) -> None:
    """Text or JSON logs on stderr; every record carries the request id of its call."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
