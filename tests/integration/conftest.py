"""Integration fixtures: a real `mlflow server` process and an in-process sidecar against it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.server.config import AppConfig, load_config
from mlflow_sidecar.server.container import ServerContainer
from mlflow_sidecar.server.grpc_server import SidecarServer
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2, tracking_pb2_grpc
from tests.support.postgres import PostgresCluster
from tests.support.processes import MlflowServer
from tests.support.s3 import MotoS3

# `sqlite` (default) or `postgresql`: the backend store of every mlflow server the tests start.
BACKEND_ENV = "SIDECAR_TEST_BACKEND"

# Tests marked with it need PostgreSQL: they run only in the PostgreSQL pass.
POSTGRESQL_MARKER = "postgresql"

# (workdir, **MlflowServer's keyword options) -> an unstarted server on the chosen backend.
MlflowServerFactory = Callable[..., MlflowServer]


def backend_under_test() -> str:
    """The backend store this run's mlflow servers use: `sqlite` or `postgresql`."""
    backend = os.environ.get(BACKEND_ENV, "sqlite")
    if backend not in ("sqlite", "postgresql"):
        raise pytest.UsageError(f"{BACKEND_ENV} must be sqlite or postgresql, not {backend!r}")
    return backend


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the `postgresql` tests unless the backend is PostgreSQL: a pass on SQLite
    neither runs nor skips them."""
    if backend_under_test() == "postgresql":
        return
    deselected = [item for item in items if item.get_closest_marker(POSTGRESQL_MARKER)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker(POSTGRESQL_MARKER)]


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the session."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mlflow_server_factory(request: pytest.FixtureRequest) -> MlflowServerFactory:
    """Makes (unstarted) mlflow servers on the chosen backend; on PostgreSQL each gets a
    fresh database of the session's cluster."""
    if backend_under_test() == "sqlite":
        return MlflowServer
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return lambda workdir, **options: MlflowServer(
        workdir, backend_uri=cluster.create_database(), **options
    )


@pytest.fixture(scope="session")
def mlflow_server(
    mlflow_server_factory: MlflowServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    server = mlflow_server_factory(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def own_mlflow(
    tmp_path: Path, mlflow_server_factory: MlflowServerFactory
) -> Iterator[MlflowServer]:
    """A dedicated mlflow server that a test may stop and start again (an outage)."""
    server = mlflow_server_factory(tmp_path / "mlflow")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """moto's S3 server on a loopback port, for the tests of artifacts on S3."""
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


def sidecar_config(data_dir: Path, tracking_uri: str, **sections: dict[str, object]) -> AppConfig:
    """A sidecar config for tests: port 0 on loopback, short retries."""
    overrides: dict[str, object] = {
        "data_dir": data_dir,
        "server": {"host": "127.0.0.1", "port": 0, "grace_s": 1.0},
        "mlflow": {"tracking_uri": tracking_uri},
        "retry": {"max_time_s": 5.0, "factor_s": 0.05, "max_backoff_s": 0.5},
    }
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}  # type: ignore[dict-item]
    return load_config(**overrides)


class RunningSidecar:
    """An in-process sidecar on a free port."""

    def __init__(self, config: AppConfig) -> None:
        self.container = ServerContainer(config=config)
        self.container.gateway().open()
        self.server: SidecarServer = self.container.server()
        self.server.start()
        self.target = f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.server.stop(0.5)


@pytest.fixture(scope="session")
def sidecar(
    mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningSidecar]:
    running = RunningSidecar(sidecar_config(tmp_path_factory.mktemp("sidecar"), mlflow_server.url))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def embedded_store_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSidecar]:
    """A sidecar on its default embedded store (SQLite and files in its data dir)."""
    running = RunningSidecar(sidecar_config(tmp_path_factory.mktemp("embedded"), ""))
    yield running
    running.stop()


@pytest.fixture(params=["mlflow-server", "embedded"])
def either_sidecar(request: pytest.FixtureRequest) -> RunningSidecar:
    """The sidecar behind an mlflow server, then the one on the embedded store."""
    name = "sidecar" if request.param == "mlflow-server" else "embedded_store_sidecar"
    running: RunningSidecar = request.getfixturevalue(name)
    return running


@pytest.fixture(scope="session")
def channel(sidecar: RunningSidecar) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sidecar.target) as chan:
        yield chan


@pytest.fixture(scope="session")
def tracking_stub(channel: grpc.Channel) -> tracking_pb2_grpc.ExperimentTrackingServiceStub:
    return tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)


@pytest.fixture(scope="session")
def registry_stub(channel: grpc.Channel) -> registry_pb2_grpc.ModelRegistryServiceStub:
    return registry_pb2_grpc.ModelRegistryServiceStub(channel)


@pytest.fixture()
def client_container(sidecar: RunningSidecar) -> Iterator[ClientContainer]:
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target, "timeout_s": 30.0})
    yield container
    container.shutdown_resources()


@pytest.fixture()
def unique() -> str:
    """A fresh suffix for names, so tests sharing one MLflow server never collide."""
    return uuid.uuid4().hex[:10]


@pytest.fixture()
def run_id(tracking_stub: tracking_pb2_grpc.ExperimentTrackingServiceStub, unique: str) -> str:
    """A fresh RUNNING run in a fresh experiment, started through the sidecar."""
    experiment_id = tracking_stub.CreateExperiment(
        tracking_pb2.CreateExperimentRequest(name=f"registry-{unique}")
    ).experiment.experiment_id
    run = tracking_stub.StartRun(tracking_pb2.StartRunRequest(experiment_id=experiment_id)).run
    return run.info.run_id
