"""`server.host` and `metrics.host` take an IPv6 address bare (`::1`) or in brackets
(`[::1]`), and both listeners bind either way."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from prometheus_client import CollectorRegistry

from mlflow_sidecar.server.config import ConfigError, host_port, load_config
from mlflow_sidecar.server.http_endpoints import HttpEndpoints, ProbeApp


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in ("HOST", "PORT"):
        monkeypatch.delenv(f"MLFLOW_SIDECAR__SERVER__{name}", raising=False)
        monkeypatch.delenv(f"MLFLOW_SIDECAR__METRICS__{name}", raising=False)
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_both_spellings_bind_both_listeners(host):
    config = load_config(server={"host": host, "port": 0}, metrics={"host": host, "port": 0})
    assert (config.server.host, config.metrics.host) == ("::1", "::1")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        assert server.add_insecure_port(host_port(config.server.host, 0)) > 0
    finally:
        server.stop(0)
    http = HttpEndpoints(
        ProbeApp(CollectorRegistry(), lambda: None),  # type: ignore[arg-type,return-value]
        config.metrics.host,
        0,
    )
    try:
        assert http.port > 0
    finally:
        http.close()


def test_addresses_put_ipv6_in_brackets_only():
    assert host_port("::1", 5) == "[::1]:5"
    assert host_port("127.0.0.1", 5) == "127.0.0.1:5"
    assert host_port("localhost", 5) == "localhost:5"


@pytest.mark.parametrize("host", ["[localhost]", "fe80::zz", "[::1"])
def test_a_host_that_is_neither_name_nor_address_is_refused_naming_the_key(host):
    with pytest.raises(ConfigError, match=r"server\.host"):
        load_config(server={"host": host})
