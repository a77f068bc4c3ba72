"""The sidecar's HTTP port: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`.

One listener, under the bind policy of `metrics.host` and speaking HTTPS with the gRPC
listener's certificate when `tls.*` is set, so probes and scrapes reach the sidecar the
same way. With mTLS (`tls.client_ca_file`) a client certificate is asked for, not
required: Kubernetes' HTTPS probes cannot present one, so `/healthz` and `/readyz` answer
without it, while `/metrics` answers only a client whose certificate the CA signed (a
certificate it did not sign ends the handshake, on every path).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from mlflow_sidecar.server.readiness import ReadinessReport

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
_JSON = [("Content-Type", "application/json")]
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
# The WSGI environ key saying the connection's client presented a certificate the CA signed.
CERTIFIED = "mlflow_sidecar.client_certified"


# How long one connection may keep its thread waiting on a read or write (a TLS handshake
# included): an idle or stalled client is dropped after it, and others never wait on it.
CLIENT_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    """One connection, in a thread of its own: its TLS handshake happens here, not in
    the listener's accept(), so a client that never finishes one blocks nobody else."""

    timeout = CLIENT_TIMEOUT_S  # StreamRequestHandler.setup puts it on the connection

    def setup(self) -> None:
        self._lost = False
        connection = self.request
        if isinstance(connection, ssl.SSLSocket):
            connection.settimeout(self.timeout)
            try:
                connection.do_handshake()
            except OSError:  # a timeout, a plain-HTTP client, a certificate refused
                self._lost = True
        super().setup()

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        connection = self.request
        # With CERT_OPTIONAL a certificate that was presented has been verified already.
        environ[CERTIFIED] = isinstance(connection, ssl.SSLSocket) and bool(
            connection.getpeercert()
        )
        return environ

    def handle(self) -> None:
        if self._lost:
            return
        # A client that goes silent or away mid-request: its loss, and nothing to log.
        with contextlib.suppress(OSError):
            super().handle()

    # Probes come every few seconds: one line each would drown the log.
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ProbeApp:
    """WSGI app: `/healthz` and `/readyz` answer JSON, `/metrics` the metrics; any other
    path is 404, so that a probe of a mistyped path fails rather than passing always."""

    def __init__(
        self, registry: CollectorRegistry, readiness: Callable[[], ReadinessReport]
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._readiness = readiness

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            # The process answers: it is alive, whatever MLflow or the spool do.
            return _answer(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz":
            report = self._readiness()
            status = "200 OK" if report.ready else "503 Service Unavailable"
            return _answer(start_response, status, report.as_json())
        if path == METRICS_PATH:
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        return _answer(
            start_response,
            "404 Not Found",
            {"error": f"no such path: {path}", "paths": [*sorted(PROBE_PATHS), METRICS_PATH]},
        )


def _answer(start_response: StartResponse, status: str, body: dict[str, object]) -> list[bytes]:
    data = json.dumps(body, separators=(",", ":")).encode()
    start_response(status, [*_JSON, ("Content-Length", str(len(data)))])
    return [data]


def _tls_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _metrics_need_a_certificate(app: WsgiApp) -> WsgiApp:
    """`app`, answering paths other than the probes only to a certified client."""

    def gated(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in PROBE_PATHS or environ.get(CERTIFIED):
            return app(environ, start_response)
        return _answer(
            start_response,
            "403 Forbidden",
            {
                "error": "mTLS is on (tls.client_ca_file): present a client certificate"
                " the CA signed to read the metrics; /healthz and /readyz need none"
            },
        )

    return gated


class HttpEndpoints:
    """The running HTTP listener; `close` releases its port."""

    def __init__(
        self,
        app: ProbeApp,
        host: str,
        port: int,
        *,
        cert_file: str | None = None,
        key_file: str | None = None,
        client_ca_file: str | None = None,
    ) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server_class = type("_Server", (ThreadingWSGIServer,), {"address_family": family[0][0]})
        served: WsgiApp = app
        if cert_file and key_file and client_ca_file is not None:
            served = _metrics_need_a_certificate(app)
        self._server: WSGIServer = make_server(
            host, port, served, server_class, handler_class=_QuietHandler
        )
        if cert_file and key_file:
            context = _tls_context(cert_file, key_file, client_ca_file)
            # The handshake runs in each connection's thread (see _QuietHandler).
            wrapped = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
            self._server.socket = cast(Any, wrapped)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http-endpoints", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop answering and release the port."""
        self._server.shutdown()
        self._server.server_close()
