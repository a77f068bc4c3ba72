"""`mlflow-sidecar health` probes the address the configuration serves on."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.cli import probe_target
from mlflow_sidecar.server.config import load_config


@pytest.mark.parametrize(
    ("host", "target"),
    [
        ("127.0.0.1", "127.0.0.1:6001"),
        ("0.0.0.0", "127.0.0.1:6001"),
        ("::", "[::1]:6001"),
        ("::1", "[::1]:6001"),
        ("localhost", "localhost:6001"),
    ],
)
def test_a_wildcard_listen_address_is_probed_on_loopback(host, target, monkeypatch):
    for name in ("MLFLOW_SIDECAR__SERVER__HOST", "MLFLOW_SIDECAR__SERVER__PORT"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(server={"host": host, "port": 6001, "allow_insecure_remote": True})
    assert probe_target(config) == target


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_is_probed_in_brackets_however_it_was_written(host, monkeypatch):
    for name in ("MLFLOW_SIDECAR__SERVER__HOST", "MLFLOW_SIDECAR__SERVER__PORT"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(server={"host": host, "port": 6001})
    assert probe_target(config) == "[::1]:6001"
