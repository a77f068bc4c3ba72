"""One call, one effect, against a real `mlflow server` that answers writes late.

A proxy holds back MLflow's answers to creates and renames for 3 s while the sidecar
gives up on a request after 1 s: each write has happened in MLflow, but the sidecar
never heard so. Each typed-client call must still make exactly one entity and return
it; the proxy counts the writes MLflow received. Then the same with the sidecar killed
(SIGKILL) after MLflow committed and before it answered: the call, repeated with the
same request id once the sidecar is back, returns that same entity.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.core.errors import SidecarError
from tests.support.delay_proxy import DelayProxy
from tests.support.processes import MlflowServer
from tests.support.sidecar_process import SidecarProcess

pytestmark = pytest.mark.integration

SLOW_SIDECAR = {
    "MLFLOW_SIDECAR__MLFLOW__REQUEST_TIMEOUT_S": "1",
    "MLFLOW_SIDECAR__RETRY__FACTOR_S": "0.05",
    "MLFLOW_SIDECAR__RETRY__MAX_BACKOFF_S": "0.2",
}


class Slow:
    """A sidecar process behind the delaying proxy, and typed clients of it."""

    def __init__(self, proxy: DelayProxy, sidecar: SidecarProcess) -> None:
        self.proxy = proxy
        self.sidecar = sidecar
        self.container = ClientContainer()
        self.container.config.from_dict({"target": sidecar.target, "timeout_s": 30.0})

    @property
    def tracking(self) -> GrpcExperimentTracking:
        return self.container.experiment_tracking()  # type: ignore[no-any-return]

    @property
    def registry(self) -> GrpcModelRegistry:
        return self.container.model_registry()  # type: ignore[no-any-return]

    def writes(self, path_suffix: str) -> int:
        return self.proxy.count("POST", path_suffix)


@pytest.fixture(scope="module")
def slow(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slow]:
    with DelayProxy(mlflow_server.url, delay_s=3.0) as proxy:
        sidecar = SidecarProcess(tmp_path_factory.mktemp("slow-sidecar"), proxy.url, **SLOW_SIDECAR)
        sidecar.start()
        world = Slow(proxy, sidecar)
        try:
            yield world
        finally:
            world.container.shutdown_resources()
            sidecar.stop()


def test_create_experiment_makes_one_experiment(slow: Slow, unique: str) -> None:
    before = slow.writes("/experiments/create")
    exp = slow.tracking.create_experiment(f"slow-{unique}")
    assert slow.writes("/experiments/create") - before == 1
    assert slow.tracking.get_experiment_by_name(f"slow-{unique}").experiment_id == exp.experiment_id


def test_start_run_makes_one_run(slow: Slow, unique: str) -> None:
    exp = slow.tracking.create_experiment(f"slow-runs-{unique}")
    before = slow.writes("/runs/create")
    run = slow.tracking.start_run(exp.experiment_id, run_name="once")
    assert slow.writes("/runs/create") - before == 1
    runs = slow.tracking.search_runs([exp.experiment_id]).items
    assert [r.run_id for r in runs] == [run.run_id]


def test_create_registered_model_makes_one_model(slow: Slow, unique: str) -> None:
    before = slow.writes("/registered-models/create")
    model = slow.registry.create_registered_model(f"slow-{unique}", description="d")
    assert model.name == f"slow-{unique}"
    assert slow.writes("/registered-models/create") - before == 1


def test_create_model_version_makes_one_version(slow: Slow, unique: str, tmp_path: Path) -> None:
    name = f"slow-mv-{unique}"
    exp = slow.tracking.create_experiment(f"slow-mv-{unique}")
    run = slow.tracking.start_run(exp.experiment_id)
    (tmp_path / "model.bin").write_bytes(b"weights")
    slow.tracking.upload_artifact(run.run_id, tmp_path / "model.bin", "model/model.bin")
    slow.registry.create_registered_model(name)
    before = slow.writes("/model-versions/create")
    version = slow.registry.create_model_version(name, run_id=run.run_id, artifact_path="model")
    assert slow.writes("/model-versions/create") - before == 1
    assert version.version == 1
    found = slow.registry.search_model_versions(filter_string=f"name = '{name}'").items
    assert [v.version for v in found] == [1]


def test_rename_registered_model_renames_once(slow: Slow, unique: str) -> None:
    slow.registry.create_registered_model(f"slow-old-{unique}")
    before = slow.writes("/registered-models/rename")
    renamed = slow.registry.rename_registered_model(f"slow-old-{unique}", f"slow-new-{unique}")
    assert renamed.name == f"slow-new-{unique}"
    assert slow.writes("/registered-models/rename") - before == 1


def test_upload_model_registers_one_version(slow: Slow, unique: str, tmp_path: Path) -> None:
    name = f"slow-up-{unique}"
    exp = slow.tracking.create_experiment(f"slow-up-{unique}")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"w" * 1000)
    before = slow.writes("/model-versions/create")
    version = slow.registry.upload_model(
        name, model_dir, experiment_id=exp.experiment_id, aliases=["candidate"]
    )
    assert slow.writes("/model-versions/create") - before == 1
    assert version.version == 1
    assert version.aliases == ("candidate",)
    found = slow.registry.search_model_versions(filter_string=f"name = '{name}'").items
    assert [v.version for v in found] == [1]


# -- a sidecar killed between MLflow's commit and its answer --------------------------


def _killed_mid_write(
    slow: Slow, call: object, path_suffix: str, *, resent: bool = False
) -> object:
    """Run `call()` in a thread, SIGKILL the sidecar once MLflow has done the write whose
    answer the proxy now holds back, and start the sidecar again.

    A unary call fails while its sidecar is dead (its deadline is short). A `resent`
    transfer waits for the sidecar to be back and is sent again whole by the typed client:
    its outcome, the first one's, is returned."""
    slow.proxy.answered.clear()
    failed: list[BaseException] = []
    answers: list[object] = []

    def run() -> None:
        try:
            answers.append(call())  # type: ignore[operator]
        except SidecarError as exc:
            failed.append(exc)

    before = slow.writes(path_suffix)
    worker = threading.Thread(target=run)
    worker.start()
    assert slow.proxy.answered.wait(60), "MLflow never received the write"
    assert slow.writes(path_suffix) - before == 1
    slow.sidecar.kill()
    if not resent:
        worker.join(60)
        assert failed, "the call must fail while its sidecar is dead"
    slow.sidecar.start()
    # The client's channel reconnects with backoff; the repeat goes out once it has.
    grpc.channel_ready_future(slow.container.channel()).result(timeout=30)
    if not resent:
        return None
    worker.join(120)
    assert not failed and answers, f"the transfer was not sent again: {failed}"
    return answers[0]


@pytest.fixture()
def patient(slow: Slow) -> Iterator[Slow]:
    """The slow world, with MLflow answering writes so late that the sidecar, with its
    request timeout raised, is still waiting when it is killed."""
    slow.sidecar.stop()
    slow.sidecar.env["MLFLOW_SIDECAR__MLFLOW__REQUEST_TIMEOUT_S"] = "60"
    slow.proxy.delay_s = 30.0
    slow.sidecar.start()
    try:
        yield slow
    finally:
        slow.proxy.delay_s = 3.0
        slow.sidecar.stop()
        slow.sidecar.env.update(SLOW_SIDECAR)
        slow.sidecar.start()


def test_writes_interrupted_by_sigkill_resolve_to_the_first_outcome(
    patient: Slow, unique: str, tmp_path: Path
) -> None:
    tracking, registry = patient.tracking, patient.registry
    rid = {kind: uuid.uuid4().hex for kind in ("exp", "run", "model", "version", "rename", "up")}

    def create_experiment():  # type: ignore[no-untyped-def]
        return tracking.create_experiment(f"kill-{unique}", request_id=rid["exp"])

    experiments_before = patient.writes("/experiments/create")
    _killed_mid_write(patient, create_experiment, "/experiments/create")
    exp = create_experiment()
    assert exp.name == f"kill-{unique}"
    assert patient.writes("/experiments/create") - experiments_before == 1

    def start_run():  # type: ignore[no-untyped-def]
        return tracking.start_run(exp.experiment_id, request_id=rid["run"])

    runs_before = patient.writes("/runs/create")
    _killed_mid_write(patient, start_run, "/runs/create")
    run = start_run()
    assert patient.writes("/runs/create") - runs_before == 1
    assert [r.run_id for r in tracking.search_runs([exp.experiment_id]).items] == [run.run_id]

    def create_model():  # type: ignore[no-untyped-def]
        return registry.create_registered_model(f"kill-{unique}", request_id=rid["model"])

    models_before = patient.writes("/registered-models/create")
    _killed_mid_write(patient, create_model, "/registered-models/create")
    assert create_model().name == f"kill-{unique}"
    assert patient.writes("/registered-models/create") - models_before == 1

    (tmp_path / "model.bin").write_bytes(b"weights")
    tracking.upload_artifact(run.run_id, tmp_path / "model.bin", "model/model.bin")

    def create_version():  # type: ignore[no-untyped-def]
        return registry.create_model_version(
            f"kill-{unique}", run_id=run.run_id, artifact_path="model", request_id=rid["version"]
        )

    versions_before = patient.writes("/model-versions/create")
    _killed_mid_write(patient, create_version, "/model-versions/create")
    assert create_version().version == 1
    assert patient.writes("/model-versions/create") - versions_before == 1

    def rename():  # type: ignore[no-untyped-def]
        return registry.rename_registered_model(
            f"kill-{unique}", f"killed-{unique}", request_id=rid["rename"]
        )

    renames_before = patient.writes("/registered-models/rename")
    _killed_mid_write(patient, rename, "/registered-models/rename")
    assert rename().name == f"killed-{unique}"
    assert patient.writes("/registered-models/rename") - renames_before == 1

    model_dir = tmp_path / "upload"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"w" * 1000)

    def upload():  # type: ignore[no-untyped-def]
        return registry.upload_model(
            f"killed-{unique}", model_dir, run_id=run.run_id, request_id=rid["up"]
        )

    uploads_before = patient.writes("/model-versions/create")
    resent = _killed_mid_write(patient, upload, "/model-versions/create", resent=True)
    assert resent.version == 2  # type: ignore[attr-defined]
    assert upload().version == 2
    assert patient.writes("/model-versions/create") - uploads_before == 1
    versions = registry.search_model_versions(filter_string=f"name = 'killed-{unique}'").items
    assert sorted(v.version for v in versions) == [1, 2]
