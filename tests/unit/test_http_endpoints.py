"""The HTTPS probe port: each connection's TLS handshake happens in its own thread, with a
timeout, so a client that connects and says nothing blocks no probe."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from mlflow_sidecar.server import http_endpoints
from mlflow_sidecar.server.http_endpoints import HttpEndpoints, ProbeApp
from mlflow_sidecar.server.readiness import ReadinessReport
from tests.support.certs import Pki, make_pki

# Only a bound on how long a broken listener can hang the test before it fails.
HANG_S = 60


@pytest.fixture()
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture()
def endpoints(pki) -> Iterator[HttpEndpoints]:
    app = ProbeApp(CollectorRegistry(), lambda: ReadinessReport(ready=True))
    listener = HttpEndpoints(
        app, "127.0.0.1", 0, cert_file=str(pki.server_cert), key_file=str(pki.server_key)
    )
    yield listener
    listener.close()


def healthz(port: int, pki: Pki) -> tuple[int, dict[str, object]]:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    connection = http.client.HTTPSConnection("localhost", port, timeout=HANG_S, context=context)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_an_idle_connection_blocks_no_probe(endpoints, pki):
    with socket.create_connection(("127.0.0.1", endpoints.port)) as idle:
        idle.settimeout(HANG_S)
        assert healthz(endpoints.port, pki) == (200, {"status": "ok"})
        assert healthz(endpoints.port, pki) == (200, {"status": "ok"})


def test_a_connection_that_never_starts_its_handshake_is_dropped(pki, monkeypatch):
    monkeypatch.setattr(http_endpoints._QuietHandler, "timeout", 0.2)
    app = ProbeApp(CollectorRegistry(), lambda: ReadinessReport(ready=True))
    listener = HttpEndpoints(
        app, "127.0.0.1", 0, cert_file=str(pki.server_cert), key_file=str(pki.server_key)
    )
    try:
        with socket.create_connection(("127.0.0.1", listener.port)) as idle:
            idle.settimeout(HANG_S)
            assert idle.recv(1) == b""  # the listener closed it
        assert healthz(listener.port, pki) == (200, {"status": "ok"})
    finally:
        listener.close()


def test_a_plain_http_client_on_the_https_port_is_refused_and_blocks_nothing(endpoints, pki):
    plain = http.client.HTTPConnection("127.0.0.1", endpoints.port, timeout=HANG_S)
    try:
        plain.request("GET", "/healthz")
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.getresponse()
    finally:
        plain.close()
    assert healthz(endpoints.port, pki) == (200, {"status": "ok"})


@pytest.mark.parametrize("path", ["/", "/ready", "/readyz/", "/health", "/metrics/x"])
def test_a_path_that_is_none_of_the_ports_is_not_found(path):
    # A probe of a mistyped path must fail, not pass on the metrics page while /readyz
    # says the sidecar is not ready.
    app = ProbeApp(CollectorRegistry(), lambda: ReadinessReport(ready=False))
    statuses: list[str] = []
    body = b"".join(
        app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda s, _h: statuses.append(s))
    )
    assert statuses == ["404 Not Found"]
    assert json.loads(body)["paths"] == ["/healthz", "/readyz", "/metrics"]
    metrics: list[str] = []
    app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET"}, lambda s, _h: metrics.append(s))
    assert metrics == ["200 OK"]
