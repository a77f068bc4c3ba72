"""Eight sidecars (eight trainer pods) against one multi-worker mlflow server on PostgreSQL.

Several server processes write to one PostgreSQL database at once, each through its own
connections: every streamed point still lands exactly once, and registrations made at
the same time through different sidecars still get distinct versions.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlflow
import pytest

from mlflow_sidecar.client import ClientContainer, RunStatus
from mlflow_sidecar.server.idempotency.ledger import REQUEST_ID_TAG
from tests.support.postgres import PostgresCluster
from tests.support.processes import MlflowServer
from tests.support.sidecar_process import SidecarProcess

# Nine servers start before the first test: more than the suite's usual 300 s per test
# may pass on a busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.postgresql, pytest.mark.timeout(900)]

SERVER_WORKERS = 4
SIDECARS = 8
KEYS = ("loss", "reward", "learning_rate", "grad_norm")
STEPS = 5_000  # 20,000 points per trainer over its keys
REGISTRATIONS_PER_SIDECAR = 4
REGISTRATIONS = SIDECARS * REGISTRATIONS_PER_SIDECAR
# How long a trainer waits for its points to reach MLflow: a bound, not a measure; on a
# busy machine the fleet's 160,000 points take a while.
DELIVERY_WAIT_S = 300.0
# How long a server may take to start: nine of them import MLflow at once on two cores.
STARTUP_WAIT_S = 240.0


@dataclass(frozen=True)
class Deployment:
    """One mlflow server with several workers, and the sidecars of eight trainer pods."""

    mlflow: MlflowServer
    sidecars: list[SidecarProcess]


def _stop_all(sidecars: list[SidecarProcess]) -> None:
    # Side by side: each waits out its own drain.
    with ThreadPoolExecutor(max_workers=len(sidecars)) as pool:
        list(pool.map(SidecarProcess.stop, sidecars))


@pytest.fixture(scope="module")
def deployment(
    postgres_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("multi-worker")
    with contextlib.ExitStack() as cleanup:
        backend_uri = postgres_cluster.create_database()
        cleanup.callback(postgres_cluster.drop_database, backend_uri)
        server = MlflowServer(
            workdir / "mlflow", backend_uri, workers=SERVER_WORKERS, job_execution=False
        )
        cleanup.callback(server.stop)
        server.start(timeout_s=STARTUP_WAIT_S)
        sidecars = [
            SidecarProcess(workdir / f"sidecar-{index}", server.url) for index in range(SIDECARS)
        ]
        cleanup.callback(_stop_all, sidecars)
        for sidecar in sidecars:
            sidecar.launch()
        for sidecar in sidecars:
            sidecar.wait_serving(timeout_s=STARTUP_WAIT_S)
        yield Deployment(server, sidecars)


@contextlib.contextmanager
def clients_of(sidecars: list[SidecarProcess]) -> Iterator[list[ClientContainer]]:
    """A typed client per sidecar, as each trainer pod has its own."""
    containers = []
    try:
        for sidecar in sidecars:
            container = ClientContainer()
            container.config.from_dict({"target": sidecar.target, "timeout_s": 120.0})
            containers.append(container)
        yield containers
    finally:
        for container in containers:
            container.shutdown_resources()


def point_value(trainer: int, key_index: int, step: int) -> float:
    """A value that names its trainer, key and step, so a point in the wrong run, under
    the wrong key or at the wrong step shows."""
    return float(step * 100 + trainer * 10 + key_index)


def test_eight_trainers_streaming_at_once_deliver_every_point_exactly_once(
    deployment: Deployment, unique: str
) -> None:
    with clients_of(deployment.sidecars) as clients:
        experiment_id = (
            clients[0].experiment_tracking().create_experiment(f"fleet-{unique}").experiment_id
        )

        def train(trainer: int) -> str:
            tracking = clients[trainer].experiment_tracking()
            run_id = tracking.start_run(experiment_id, run_name=f"trainer-{trainer}").run_id
            with clients[trainer].metric_stream() as stream:
                for step in range(STEPS):
                    metrics = {key: point_value(trainer, k, step) for k, key in enumerate(KEYS)}
                    stream.log_metrics(run_id, metrics, step=step)
            assert stream.accepted == STEPS * len(KEYS)
            # The end is recorded now and reaches MLflow right after the run's last point.
            tracking.end_run(run_id, RunStatus.FINISHED)
            flushed = tracking.flush_metrics(run_id, timeout_s=DELIVERY_WAIT_S)
            assert flushed.complete and flushed.dead_letter_points == 0
            return run_id

        with ThreadPoolExecutor(max_workers=SIDECARS) as pool:
            run_ids = list(pool.map(train, range(SIDECARS)))

    plain = mlflow.MlflowClient(tracking_uri=deployment.mlflow.url)
    for trainer, run_id in enumerate(run_ids):
        assert plain.get_run(run_id).info.status == "FINISHED"
        for k, key in enumerate(KEYS):
            history = plain.get_metric_history(run_id, key)
            points = {(m.step, m.value) for m in history}
            # As many points as steps, and as many distinct ones: none twice, none missing.
            assert len(history) == STEPS
            assert points == {(step, point_value(trainer, k, step)) for step in range(STEPS)}


def test_registrations_through_eight_sidecars_at_once_get_distinct_versions(
    deployment: Deployment, unique: str
) -> None:
    name = f"fleet-model-{unique}"
    plain = mlflow.MlflowClient(tracking_uri=deployment.mlflow.url)
    with clients_of(deployment.sidecars) as clients:
        tracking = clients[0].experiment_tracking()
        experiment_id = tracking.create_experiment(f"fleet-registry-{unique}").experiment_id
        run_id = tracking.start_run(experiment_id).run_id
        clients[0].model_registry().create_registered_model(name)
        # Each sidecar gets REGISTRATIONS_PER_SIDECAR of the calls, all in flight together.
        calls = [(index % SIDECARS, uuid.uuid4().hex) for index in range(REGISTRATIONS)]

        def register(call: tuple[int, str]) -> int:
            sidecar, request_id = call
            version = (
                clients[sidecar]
                .model_registry()
                .create_model_version(
                    name, source=f"runs:/{run_id}/model-{request_id}", request_id=request_id
                )
            )
            assert version.source == f"runs:/{run_id}/model-{request_id}"
            return version.version

        with ThreadPoolExecutor(max_workers=REGISTRATIONS) as pool:
            versions = list(pool.map(register, calls))
        version_of = {
            request_id: version for (_, request_id), version in zip(calls, versions, strict=True)
        }
        assert sorted(versions) == list(range(1, REGISTRATIONS + 1))

        stored = plain.search_model_versions(f"name = '{name}'", max_results=100)
        assert sorted(int(v.version) for v in stored) == list(range(1, REGISTRATIONS + 1))
        # Each request made one version, the one its caller was given.
        assert sorted(v.tags[REQUEST_ID_TAG] for v in stored) == sorted(version_of)
        assert {v.tags[REQUEST_ID_TAG]: int(v.version) for v in stored} == version_of

        # A retry, through another sidecar (which finds the version by its request id in
        # MLflow) and through the first one (its request ledger), is the same version.
        sidecar, request_id = calls[REGISTRATIONS // 2]
        for retried_through in ((sidecar + 1) % SIDECARS, sidecar):
            again = (
                clients[retried_through]
                .model_registry()
                .create_model_version(
                    name, source=f"runs:/{run_id}/model-{request_id}", request_id=request_id
                )
            )
            assert again.version == version_of[request_id]
    stored = plain.search_model_versions(f"name = '{name}'", max_results=100)
    assert len(stored) == REGISTRATIONS
