"""The MlflowPort and LoggedModelsPort contracts, held against MlflowGateway and
LoggedModelGateway on MLflow's embedded store and on a real `mlflow server` (SQLite or
PostgreSQL, as the integration run chooses).

The same tests run against the in-memory fake in tests/unit/test_mlflow_port_contract.py."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway, MlflowPort
from mlflow_sidecar.server.mlflow_gateway.logged_models import LoggedModelGateway
from mlflow_sidecar.server.mlflow_gateway.port import LoggedModelsPort
from tests.contract.logged_models_port import LoggedModelsPortContract
from tests.contract.mlflow_port import MlflowPortContract
from tests.integration.conftest import sidecar_config
from tests.support.processes import MlflowServer


@pytest.fixture(scope="module")
def embedded_gateway(tmp_path_factory: pytest.TempPathFactory) -> MlflowGateway:
    """A gateway on the embedded store, as the sidecar makes it by default."""
    config = load_config(
        data_dir=tmp_path_factory.mktemp("embedded-port"),
        retry={"max_time_s": 5.0, "factor_s": 0.05, "max_backoff_s": 0.5},
    )
    gateway = MlflowGateway(config)
    gateway.open()
    return gateway


@pytest.fixture(scope="module")
def server_gateway(
    mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> MlflowGateway:
    """A gateway on the session's `mlflow server`."""
    gateway = MlflowGateway(sidecar_config(tmp_path_factory.mktemp("port"), mlflow_server.url))
    gateway.open()
    return gateway


@pytest.fixture(params=["embedded", "mlflow-server"])
def gateway(request: pytest.FixtureRequest) -> MlflowGateway:
    """The gateway on each MLflow the contract is held against."""
    name = "embedded_gateway" if request.param == "embedded" else "server_gateway"
    found: MlflowGateway = request.getfixturevalue(name)
    return found


class TestMlflowGateway(MlflowPortContract):
    @pytest.fixture()
    def port(self, gateway: MlflowGateway) -> MlflowPort:
        return gateway


class TestLoggedModelGateway(LoggedModelsPortContract):
    @pytest.fixture()
    def port(self, gateway: MlflowGateway) -> MlflowPort:
        return gateway

    @pytest.fixture()
    def models(self, gateway: MlflowGateway) -> LoggedModelsPort:
        return LoggedModelGateway(gateway)
