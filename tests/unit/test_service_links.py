"""The variables Kubernetes sets for a Service named `mlflow-sidecar` (or
`mlflow-sidecar-...`) pass the checks of unknown `MLFLOW_SIDECAR_*` variables, on the
sidecar's side and the client's; settings spelt with one underscore too few do not."""

from __future__ import annotations

import pytest

from mlflow_sidecar.client import ClientContainer, load_env
from mlflow_sidecar.core.service_links import is_service_link
from mlflow_sidecar.server.config import ConfigError, load_config

# What a pod gets for `Service mlflow-sidecar` (ports grpc 50051, metrics 9464) and for
# `Service mlflow-sidecar-metrics`.
SERVICE_LINKS = {
    "MLFLOW_SIDECAR_SERVICE_HOST": "10.96.0.7",
    "MLFLOW_SIDECAR_SERVICE_PORT": "50051",
    "MLFLOW_SIDECAR_SERVICE_PORT_GRPC": "50051",
    "MLFLOW_SIDECAR_PORT": "tcp://10.96.0.7:50051",
    "MLFLOW_SIDECAR_PORT_50051_TCP": "tcp://10.96.0.7:50051",
    "MLFLOW_SIDECAR_PORT_50051_TCP_PROTO": "tcp",
    "MLFLOW_SIDECAR_PORT_50051_TCP_PORT": "50051",
    "MLFLOW_SIDECAR_PORT_50051_TCP_ADDR": "10.96.0.7",
    "MLFLOW_SIDECAR_METRICS_SERVICE_HOST": "fd00::7",
    "MLFLOW_SIDECAR_METRICS_PORT_9464_TCP": "tcp://[fd00::7]:9464",
}
# Settings missing an underscore, which must still be refused.
TYPOS = {
    "MLFLOW_SIDECAR_SERVER_PORT": "50051",
    "MLFLOW_SIDECAR_SERVICE_HOST": "sidecar.local",
    "MLFLOW_SIDECAR_PORT": "50051",
    "MLFLOW_SIDECAR_PORT_50051_TCP_PORT": "fifty",
}


@pytest.mark.parametrize(("name", "value"), SERVICE_LINKS.items())
def test_a_service_link_is_told_apart(name: str, value: str) -> None:
    assert is_service_link(name, value)


@pytest.mark.parametrize(("name", "value"), TYPOS.items())
def test_a_misspelt_setting_is_no_service_link(name: str, value: str) -> None:
    assert not is_service_link(name, value)


def test_the_sidecar_starts_among_service_links(monkeypatch, tmp_path) -> None:
    for name, value in SERVICE_LINKS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    assert load_config().data_dir == tmp_path
    monkeypatch.setenv("MLFLOW_SIDECAR_SERVER_PORT", "50052")
    with pytest.raises(ConfigError, match="unknown variable MLFLOW_SIDECAR_SERVER_PORT"):
        load_config()


def test_a_client_loads_its_settings_among_service_links(monkeypatch) -> None:
    for name, value in SERVICE_LINKS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TARGET", "10.0.0.1:50051")
    container = ClientContainer()
    load_env(container)
    assert container.config.target() == "10.0.0.1:50051"
    monkeypatch.setenv("MLFLOW_SIDECAR_TIMEOUT_S", "5")
    with pytest.raises(ValueError, match="unknown variable MLFLOW_SIDECAR_TIMEOUT_S"):
        load_env(ClientContainer())
