"""A background probe of MLflow's reachability, reported as its own health service.

The sidecar's services keep SERVING while MLflow is down (the spool takes metrics meanwhile),
so MLflow's state gets a separate name that probes and dashboards can ask for."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2
from opentelemetry.instrumentation.utils import suppress_instrumentation

log = logging.getLogger(__name__)

MLFLOW_HEALTH_SERVICE = "mlflow"
# The least time a ping is given to answer before MLflow counts as unreachable.
_MIN_ANSWER_S = 5.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _UnansweredError(Exception):
    """MLflow took the ping and has not answered it in time."""


class MlflowProbe:
    """Calls `ping` every `interval_s` and sets the `mlflow` health service from the outcome.

    A WARNING is logged on every change between reachable and unreachable (not on every
    failed ping, which would flood the log during a long outage)."""

    def __init__(
        self,
        ping: Callable[[], None],
        health_servicer: health.HealthServicer,
        interval_s: float,
        service: str = MLFLOW_HEALTH_SERVICE,
        *,
        answer_s: float | None = None,
    ) -> None:
        self._ping = ping
        # A hung MLflow accepts the connection and never answers: a ping is waited for
        # this long (not MLflow's request timeout, 30 s, twice), then counts as a failure.
        self._answer_s = max(_MIN_ANSWER_S, 2 * interval_s) if answer_s is None else answer_s
        # The ping still waiting for its answer; no second one is sent meanwhile.
        self._in_flight: concurrent.futures.Future[None] | None = None
        self._pinger = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mlflow-ping"
        )
        self._health = health_servicer
        self._interval_s = interval_s
        self._service = service
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._reachable: bool | None = None

    @property
    def reachable(self) -> bool | None:
        """The last outcome; None before the first probe."""
        return self._reachable

    def start(self) -> None:
        """Probe once at once, then every interval, in a daemon thread."""
        self._health.set(self._service, health_pb2.HealthCheckResponse.UNKNOWN)
        self._thread = threading.Thread(target=self._run, name="mlflow-probe", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the probe (waiting for a ping in progress at most `timeout_s`) and report
        NOT_SERVING, as the rest of a stopping server does."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self._pinger.shutdown(wait=False)
        self._health.set(self._service, _NOT_SERVING)

    def probe_once(self) -> bool:
        """One probe; updates the health service and logs a change. Returns reachability.

        A failed ping is tried once more at once, and only a second failure counts: a
        server that closes an idle keep-alive connection just as the ping reuses it
        (uvicorn, MLflow's server, closes them after 5 s, the probe's default interval)
        fails that one request, which says nothing about whether MLflow is reachable; the
        second try opens a fresh connection."""
        for attempt in (1, 2):
            try:
                self._answered_ping()
            except _UnansweredError as exc:
                self._record(False, str(exc))
                return False
            except Exception as exc:  # noqa: BLE001 - a failed ping means "unreachable"
                if attempt == 1 and not self._stopping.is_set():
                    log.debug("MLflow ping failed, trying once more: %s", exc)
                    continue
                lines = str(exc).splitlines()
                self._record(False, lines[0] if lines else type(exc).__name__)
                return False
            break
        self._record(True, "")
        return True

    def _answered_ping(self) -> None:
        """One ping, waited for at most `answer_s`; `_UnansweredError` when it is still waiting
        then (or an earlier one still is)."""
        if self._in_flight is None or self._in_flight.done():
            self._in_flight = self._pinger.submit(self._traceless_ping)
        try:
            self._in_flight.result(timeout=self._answer_s)
        except concurrent.futures.TimeoutError:
            raise _UnansweredError(f"MLflow did not answer within {self._answer_s:g}s") from None

    def _traceless_ping(self) -> None:
        # Not traced: a span every few seconds would bury the traces of real calls.
        with suppress_instrumentation():
            self._ping()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.probe_once()
            self._stopping.wait(self._interval_s)

    def _record(self, reachable: bool, reason: str) -> None:
        if self._stopping.is_set():
            return
        changed = reachable != self._reachable
        first = self._reachable is None
        self._reachable = reachable
        if not changed:
            return
        self._health.set(self._service, _SERVING if reachable else _NOT_SERVING)
        if not reachable:
            log.warning(
                "MLflow is unreachable: health service %r is NOT_SERVING (%s)",
                self._service,
                reason,
            )
        elif not first:
            log.warning("MLflow is reachable again: health service %r is SERVING", self._service)
        else:
            log.info("MLflow is reachable: health service %r is SERVING", self._service)
