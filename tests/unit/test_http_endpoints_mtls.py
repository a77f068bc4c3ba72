"""The HTTPS probe port under mTLS (`tls.client_ca_file`): Kubernetes' probes, which cannot
present a client certificate, are answered; the metrics only to a client the CA certified;
a certificate another CA signed is refused on every path."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from mlflow_sidecar.server.http_endpoints import HttpEndpoints, ProbeApp
from mlflow_sidecar.server.readiness import ReadinessReport
from tests.support import certs
from tests.support.certs import Pki, make_pki

HANG_S = 60


@pytest.fixture()
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture()
def mtls(pki) -> Iterator[HttpEndpoints]:
    registry = CollectorRegistry()
    Counter("probe_marker", "a series to find in the scrape", registry=registry).inc()
    app = ProbeApp(registry, lambda: ReadinessReport(ready=True))
    listener = HttpEndpoints(
        app,
        "127.0.0.1",
        0,
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        client_ca_file=str(pki.ca_cert),
    )
    yield listener
    listener.close()


def get(port: int, pki: Pki, path: str, cert: tuple[Path, Path] | None = None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    connection = http.client.HTTPSConnection("localhost", port, timeout=HANG_S, context=context)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_need_no_client_certificate(mtls, pki, path):
    status, body = get(mtls.port, pki, path)
    assert status == 200
    assert json.loads(body)["status"] in {"ok", "ready"}


def test_the_metrics_need_a_certified_client(mtls, pki):
    status, body = get(mtls.port, pki, "/metrics")
    assert status == 403
    assert "client certificate" in json.loads(body)["error"]
    assert "probe_marker" not in body


def test_a_certified_client_reads_the_metrics(mtls, pki):
    status, body = get(mtls.port, pki, "/metrics", cert=(pki.client_cert, pki.client_key))
    assert status == 200
    assert "probe_marker_total 1.0" in body


def test_a_certificate_of_another_ca_is_refused_on_every_path(mtls, pki, tmp_path):
    other_ca, other_key = certs._ca("other ca")
    stranger, stranger_key = certs._leaf(other_ca, other_key, "stranger", server=False)
    cert = (
        certs._write_cert(stranger, tmp_path / "stranger.pem"),
        certs._write_key(stranger_key, tmp_path / "stranger-key.pem"),
    )
    for path in ("/healthz", "/metrics"):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            get(mtls.port, pki, path, cert=cert)
