"""The threaded gRPC server: services, health, reflection, interceptors, drain-then-stop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mlflow_sidecar.server.auth import AuthInterceptor
from mlflow_sidecar.server.call_drain import CallDrain
from mlflow_sidecar.server.config import AppConfig, host_port, insecure_listener_warnings
from mlflow_sidecar.server.http_endpoints import HttpEndpoints, ProbeApp
from mlflow_sidecar.server.idempotency import IdempotencyInterceptor, RequestLedger
from mlflow_sidecar.server.interceptors import AccessLogInterceptor, ErrorMappingInterceptor
from mlflow_sidecar.server.mlflow_probe import MlflowProbe
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.readiness import Readiness, SpoolDepth
from mlflow_sidecar.server.reflection import enable_server_reflection
from mlflow_sidecar.server.stream_admission import StreamAdmissionInterceptor, StreamSlots
from mlflow_sidecar.server.tracing import Tracing
from mlflow_sidecar.v1 import registry_pb2, registry_pb2_grpc, tracking_pb2, tracking_pb2_grpc

log = logging.getLogger(__name__)

TRACKING_SERVICE = tracking_pb2.DESCRIPTOR.services_by_name["ExperimentTrackingService"].full_name
REGISTRY_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistryService"].full_name
SERVICE_NAMES = (TRACKING_SERVICE, REGISTRY_SERVICE)
# How long the stop waits, once the calls left at the end of the grace period are
# cancelled, for their handlers to write their access log lines: they wake at the cancel and
# take milliseconds, but a handler stuck elsewhere must not hold the process.
HANDLERS_AFTER_CUT_S = 0.5
# grpc's own cancel comes this much after the grace period, should the stop's own fail.
_GRPC_CANCEL_AFTER_S = 5.0
# The shortest interval between a client's keepalive pings that the sidecar accepts.
KEEPALIVE_MIN_PING_INTERVAL_MS = 10_000


def _server_credentials(config: AppConfig) -> grpc.ServerCredentials:
    tls = config.tls
    assert tls.cert_file is not None and tls.key_file is not None
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class BackgroundTask(Protocol):
    """Work that runs while the server serves (e.g. the metric deliverer)."""

    def start(self) -> None:
        """Begin."""

    def stop(self, timeout_s: float) -> None:
        """End within `timeout_s`; called after the server has drained."""


class Drainable(Protocol):
    """What is left to deliver when the server stops (the metric deliverer)."""

    def wait_delivered(self, run_id: str, timeout_s: float) -> int:
        """Wait up to `timeout_s` for every pending point ("" = all runs); returns what is
        left."""

    def ends_left(self) -> int:
        """Run ends recorded through the sidecar that MLflow has not been told of yet."""


class OpenStreams(Protocol):
    """Response streams that stay open until the client leaves (alias watches)."""

    def end_all(self) -> None:
        """End every stream now and refuse new ones: the server is stopping."""


class BindError(RuntimeError):
    """The listen address could not be bound."""


class SidecarServer:
    """Owns the grpc server and its health status."""

    def __init__(
        self,
        config: AppConfig,
        tracking: tracking_pb2_grpc.ExperimentTrackingServiceServicer,
        registry: registry_pb2_grpc.ModelRegistryServiceServicer,
        *,
        background: Sequence[BackgroundTask] = (),
        metrics: SidecarMetrics | None = None,
        ledger: RequestLedger | None = None,
        drain: Drainable | None = None,
        mlflow_ping: Callable[[], None] | None = None,
        spool: SpoolDepth | None = None,
        tracing: Tracing | None = None,
        open_streams: Sequence[OpenStreams] = (),
    ) -> None:
        self._config = config
        self._drain = drain
        self._open_streams = tuple(open_streams)
        self._background = tuple(background)
        self.metrics = metrics or SidecarMetrics()
        self.metrics_port: int | None = None
        self._http: HttpEndpoints | None = None
        self._serving = False
        server = config.server
        self._tracing = tracing
        self._calls = CallDrain()
        self.stream_slots = StreamSlots(
            server.max_streaming_rpcs,
            server.max_waiting_streams,
            server.stream_wait_s,
            self.metrics.streams_refused.inc,
        )
        self.metrics.streams_in_progress.set_function(lambda: self.stream_slots.in_use)
        self.metrics.streams_waiting.set_function(lambda: self.stream_slots.waiting)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=server.workers, thread_name_prefix="rpc"),
            interceptors=self._interceptors(ledger),
            options=[
                ("grpc.max_receive_message_length", server.max_message_bytes),
                ("grpc.max_send_message_length", server.max_message_bytes),
                ("grpc.max_concurrent_streams", server.max_concurrent_streams),
                # Soft and hard limit alike: above it every call is refused, none by chance.
                ("grpc.max_metadata_size", server.max_metadata_bytes),
                ("grpc.absolute_max_metadata_size", server.max_metadata_bytes),
                # Accept clients' keepalive pings every 10 s or more (the typed client's come
                # every 30 s; proxies and other languages' clients often ping every 10 s),
                # with calls in flight or not; grpc's default answers pings more often than
                # every 5 minutes with GOAWAY too_many_pings, which ends every call.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MIN_PING_INTERVAL_MS),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=server.max_concurrent_rpcs,
        )
        tracking_pb2_grpc.add_ExperimentTrackingServiceServicer_to_server(tracking, self._server)
        registry_pb2_grpc.add_ModelRegistryServiceServicer_to_server(registry, self._server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.mlflow_probe: MlflowProbe | None = None
        if mlflow_ping is not None:
            self.mlflow_probe = MlflowProbe(
                mlflow_ping, self.health, config.mlflow.probe_interval_s
            )
            self._background = (*self._background, self.mlflow_probe)
        probe = self.mlflow_probe
        if probe is not None:
            self.metrics.watch_mlflow(lambda: probe.reachable)
        self.readiness = Readiness(
            lambda: self._serving,
            spool=spool,
            spool_high_water=config.health.spool_high_water,
            mlflow_reachable=(lambda: probe.reachable) if probe is not None else None,
            require_mlflow=config.health.ready_requires_mlflow,
        )
        # grpc.reflection.v1 and v1alpha: grpcurl and newer tools ask v1 first.
        enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME), self._server)
        address = host_port(config.server.host, config.server.port)
        try:
            if config.tls.enabled:
                self.port = self._server.add_secure_port(address, _server_credentials(config))
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise BindError(f"cannot listen on {address}: {exc}") from exc
        if self.port == 0:
            raise BindError(f"cannot listen on {address}")
        self.address = host_port(config.server.host, self.port)
        self._stopped = threading.Event()
        if config.metrics.port:
            self._bind_http()

    def _interceptors(self, ledger: RequestLedger | None) -> list[grpc.ServerInterceptor]:
        """The chain every call goes through, outermost first."""
        config = self._config
        interceptors: list[grpc.ServerInterceptor] = []
        if self._tracing is not None:
            # Outermost: the access log and everything below run inside the call's span.
            interceptors.append(self._tracing.interceptor)
        interceptors.append(AccessLogInterceptor(self.metrics, self._calls))
        if config.auth.enabled:
            interceptors.append(AuthInterceptor(config.auth.load_tokens()))
        interceptors.append(
            ErrorMappingInterceptor(
                config.server.default_deadline_s, config.server.max_message_bytes
            )
        )
        # Inside the error mapping, so a refusal carries its reason like any other error;
        # outside the ledger, so a refused call leaves no trace there and a waiting one
        # has not claimed its request id yet.
        interceptors.append(StreamAdmissionInterceptor(self.stream_slots, SERVICE_NAMES))
        if ledger is not None:
            # Inside the error mapping: a refused request id is an error like any other.
            interceptors.append(IdempotencyInterceptor(ledger))
        return interceptors

    def _bind_http(self) -> None:
        # Bound with the gRPC port, so a taken port fails before anything starts.
        exporter, tls = self._config.metrics, self._config.tls
        try:
            self._http = HttpEndpoints(
                ProbeApp(self.metrics.registry, self.readiness.report),
                exporter.host,
                exporter.port,
                # The listener's TLS covers this port too: the bind policy relies on it.
                cert_file=str(tls.cert_file) if tls.cert_file else None,
                key_file=str(tls.key_file) if tls.key_file else None,
                client_ca_file=str(tls.client_ca_file) if tls.client_ca_file else None,
            )
        except OSError as exc:
            raise BindError(
                f"invalid config key metrics.port (MLFLOW_SIDECAR__METRICS__PORT): cannot"
                f" listen on {host_port(exporter.host, exporter.port)} ({exc.strerror or exc})"
            ) from exc
        self.metrics_port = self._http.port

    def start(self) -> None:
        """Start background work and serving; report SERVING for every service."""
        if self.metrics_port is not None:
            log.info(
                "metrics and probes on %s://%s/metrics, /healthz, /readyz",
                "https" if self._config.tls.enabled else "http",
                host_port(self._config.metrics.host, self.metrics_port),
            )
        if self._tracing is not None:
            self._tracing.start()
        for task in self._background:
            task.start()
        for warning in insecure_listener_warnings(self._config):
            log.warning("%s", warning)
        self._server.start()
        self._serving = True
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("mlflow-sidecar serving on %s", self.address)

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: report NOT_SERVING, end the open streams (alias watches: UNAVAILABLE,
        SHUTTING_DOWN), refuse new calls, let running calls finish within grace; meanwhile
        deliver pending points for up to `spool.drain_on_stop_s`, then say how many are
        left for the next start. `wait()` returns afterwards even if a step failed."""
        try:
            self._drain_and_stop(self._config.server.grace_s if grace_s is None else grace_s)
        except Exception:
            # A failed step must not keep the process from ending: what is accepted is in
            # the spool and the ledger, which the next start reads.
            log.exception("stopping failed; the sidecar stops anyway")
        finally:
            self._stopped.set()
            log.info("stopped")

    def _drain_and_stop(self, grace: float) -> None:
        stop_by = time.monotonic() + grace
        drain_until = time.monotonic() + min(self._config.spool.drain_on_stop_s, grace)
        self._serving = False
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # Streams that end only when their client leaves would hold the drain for the whole
        # grace period: they end first (their clients open them again elsewhere or later).
        for streams in self._open_streams:
            streams.end_all()
        log.info("draining for up to %.1fs", grace)
        stopped = self._server.stop(grace + _GRPC_CANCEL_AFTER_S)
        if not stopped.wait(grace):
            # Marked before the cancel, so that each one's access line says what its
            # client saw (UNAVAILABLE); grpc's own timer would cancel first, unmarked.
            self._calls.cut_off_running()
            self._server.stop(None)
        left = self._calls.wait_finished(HANDLERS_AFTER_CUT_S)
        if left:
            log.warning(
                "%d calls were still running when the sidecar stopped; their access log lines"
                " are missing",
                left,
            )
        if self._drain is not None:
            # The deliverer has been delivering all along; this waits for the rest.
            self._drain.wait_delivered("", max(0.0, drain_until - time.monotonic()))
        # Within the grace period: a batch still out when it ends stays in the spool.
        for task in reversed(self._background):
            task.stop(max(0.0, stop_by - time.monotonic()))
        if self._drain is not None:
            # Counted once nothing is in flight, so the count is what the next start finds.
            left = self._drain.wait_delivered("", 0.0)
            ends = self._drain.ends_left()
            if left:
                log.error(
                    "%d metric points are left in the spool, to be delivered at the next start",
                    left,
                )
            else:
                log.info("every accepted metric point was delivered before stopping")
            if ends:
                # Said apart from the points: with every point delivered, an end that
                # EndRun acknowledged still lives only in the spool, and a data dir
                # dropped with the pod would leave its run RUNNING in MLflow for good.
                log.error(
                    "%d run ends recorded by EndRun are left in the spool, not yet applied in"
                    " MLflow (their runs stay RUNNING there): they are applied at the next"
                    " start on this data dir",
                    ends,
                )
        if self._http is not None:
            self._http.close()
        if self._tracing is not None:
            self._tracing.stop()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until `stop` has finished, or for `timeout_s`; whether it has."""
        return self._stopped.wait(timeout_s)

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.health.set("", status)
        for name in SERVICE_NAMES:
            self.health.set(name, status)
