"""Prometheus metrics: the standard gRPC server series and the sidecar's own.

The gRPC series carry the names and labels of go-grpc-prometheus / py-grpc-prometheus
(`grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`, ...), so the
usual gRPC dashboards and alerts work unchanged. Each sidecar owns its registry (several
can live in one process, as in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# Outcomes the caller brought about (a missing resource, a bad or stale request, no
# credentials): the sidecar did its job, so they are not its errors, not in the error-rate
# panels nor at WARNING in the access log.
CLIENT_CAUSED_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


def sidecar_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare source tree)."""
    try:
        return metadata.version("mlflow-sidecar")
    except metadata.PackageNotFoundError:
        return "unknown"


class SpoolGauges(Collector):
    """Reads the spool's depth at scrape time, so the numbers are never stale."""

    def __init__(self, read: Callable[[], tuple[int, float, int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending, oldest_age_s, dead, held_ends = self._read()
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
        yield GaugeMetricFamily(
            "mlflow_sidecar_spool_held_run_ends",
            "Run ends MLflow refused, kept for mlflow-sidecar spool requeue",
            value=held_ends,
        )


class MlflowUpGauge(Collector):
    """1 while MLflow answered the last probe, 0 while it fails or before the first one."""

    def __init__(self, reachable: Callable[[], bool | None]) -> None:
        self._reachable = reachable

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "mlflow_sidecar_mlflow_up",
            "Whether MLflow answered the sidecar's last reachability probe",
            value=1 if self._reachable() else 0,
        )


@dataclass(frozen=True)
class MethodSeries:
    """The label-bound series of one gRPC method, made once rather than on every call."""

    started: Counter
    received: Counter
    sent: Counter
    seconds: Histogram
    handled: Callable[[str], Counter]


class SidecarMetrics:
    """Every Prometheus series of one sidecar."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.grpc_started = Counter(
            "grpc_server_started", "RPCs started on the server", _GRPC_LABELS, registry=r
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status code",
            (*_GRPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status",
            _GRPC_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_received = Counter(
            "grpc_server_msg_received", "Request messages received", _GRPC_LABELS, registry=r
        )
        self.grpc_sent = Counter(
            "grpc_server_msg_sent", "Response messages sent", _GRPC_LABELS, registry=r
        )
        Gauge(
            "mlflow_sidecar_build_info",
            "Always 1; the sidecar's version as a label",
            ["version"],
            registry=r,
        ).labels(sidecar_version()).set(1)
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
        self.late_creates_removed = Counter(
            "mlflow_sidecar_late_creates_removed",
            "Second runs or versions of one request id, made by a try that landed in MLflow"
            " after the call had answered, and removed again",
            ["kind"],
            registry=r,
        )
        self.points_accepted = Counter(
            "mlflow_sidecar_metric_points_accepted", "Points committed to the spool", registry=r
        )
        self.points_delivered = Counter(
            "mlflow_sidecar_metric_points_delivered", "Points MLflow confirmed", registry=r
        )
        self.delivery_calls_limit = Gauge(
            "mlflow_sidecar_delivery_calls_limit",
            "log_batch calls the deliverer keeps in flight now, fitted to what MLflow gains"
            " from them (at most spool.delivery_workers)",
            registry=r,
        )
        self.stream_bytes = Counter(
            "mlflow_sidecar_stream_bytes",
            "Bytes of artifacts and models streamed",
            ["direction"],
            registry=r,
        )
        for direction in ("upload", "download"):
            self.stream_bytes.labels(direction)
        self.model_cache_hits = Counter(
            "mlflow_sidecar_model_cache_hits",
            "DownloadModel calls answered from the model cache, without MLflow",
            registry=r,
        )
        self.model_cache_misses = Counter(
            "mlflow_sidecar_model_cache_misses",
            "DownloadModel calls the model cache could not answer (fetched from MLflow)",
            registry=r,
        )
        self.model_cache_evictions = Counter(
            "mlflow_sidecar_model_cache_evictions",
            "Versions removed from the model cache to stay within model_cache.max_bytes",
            registry=r,
        )
        self.model_cache_corrupt = Counter(
            "mlflow_sidecar_model_cache_corrupt_entries",
            "Model cache entries that failed verification and were fetched again",
            registry=r,
        )
        self.model_cache_handoffs = Counter(
            "mlflow_sidecar_model_cache_handoffs",
            "DownloadModel calls answered with the cache entry's place (accept_cache_entry):"
            " the client read the files through a shared volume",
            registry=r,
        )
        self.model_cache_bytes = Gauge(
            "mlflow_sidecar_model_cache_bytes",
            "Bytes of model files in the model cache",
            registry=r,
        )
        self.streams_refused = Counter(
            "mlflow_sidecar_streams_refused",
            "Streaming calls refused: server.max_streaming_rpcs were in progress and the line"
            " was full (server.max_waiting_streams), or no slot freed within"
            " server.stream_wait_s",
            registry=r,
        )
        self.streams_in_progress = Gauge(
            "mlflow_sidecar_streams_in_progress",
            "Streaming calls admitted and not yet finished (at most server.max_streaming_rpcs)",
            registry=r,
        )
        self.streams_waiting = Gauge(
            "mlflow_sidecar_streams_waiting",
            "Streaming calls waiting in line for a slot (at most server.max_waiting_streams)",
            registry=r,
        )
        self.alias_watch_pollers = Gauge(
            "mlflow_sidecar_alias_watch_pollers",
            "Registered models whose aliases are polled for WatchModelAlias streams",
            registry=r,
        )
        self.alias_watch_streams = Gauge(
            "mlflow_sidecar_alias_watch_streams", "Open WatchModelAlias streams", registry=r
        )
        self.alias_watch_polls = Counter(
            "mlflow_sidecar_alias_watch_polls",
            "Polls of a watched model's aliases, by outcome: ok, model_missing (the model does"
            " not exist), unreachable (MLflow could not be asked), error (MLflow refused)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("ok", "model_missing", "unreachable", "error"):
            self.alias_watch_polls.labels(outcome)
        self._mlflow_up: MlflowUpGauge | None = None

    def method_series(self, grpc_type: str, full_method: str) -> MethodSeries:
        """The series of `full_method` (`/package.Service/Method`), labelled as the standard
        gRPC exporters label them."""
        service, _, method = full_method.lstrip("/").rpartition("/")
        labels = (grpc_type, service, method)
        handled = self.grpc_handled

        def handled_with(code: str) -> Counter:
            return handled.labels(*labels, code)

        return MethodSeries(
            started=self.grpc_started.labels(*labels),
            received=self.grpc_received.labels(*labels),
            sent=self.grpc_sent.labels(*labels),
            seconds=self.grpc_seconds.labels(*labels),
            handled=handled_with,
        )

    def watch_spool(self, read: Callable[[], tuple[int, float, int, int]]) -> None:
        """Publish the spool's depth, oldest age and dead letters."""
        self.registry.register(SpoolGauges(read))

    def watch_mlflow(self, reachable: Callable[[], bool | None]) -> None:
        """Publish MLflow's reachability as `mlflow_sidecar_mlflow_up` (once per sidecar)."""
        if self._mlflow_up is None:
            self._mlflow_up = MlflowUpGauge(reachable)
            self.registry.register(self._mlflow_up)
