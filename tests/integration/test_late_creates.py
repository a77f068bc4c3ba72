"""One call, one effect, when a try of a create reaches MLflow after the call answered.

A proxy holds the first create request of each kind for 5 s before passing it on, while
the sidecar gives up on a request after 2 s: the sidecar's next try finds nothing and
creates, the call answers with that entity, and then the held try lands and makes a
second one. The sidecar looks again after it answered and removes the second one; a
later lookup by the request id (another sidecar, a forgotten ledger) finds the answered
entity, never the removed one.
"""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from mlflow_sidecar.client import ClientContainer, ExperimentTracking, ModelRegistry
from tests.support.delay_proxy import DelayProxy
from tests.support.processes import MlflowServer, free_port
from tests.support.sidecar_process import SidecarProcess

pytestmark = pytest.mark.integration

REQUEST_ID_TAG = "mlflow_sidecar.request_id"
DUPLICATE_OF_TAG = "mlflow_sidecar.duplicate_of"


class _FirstOf:
    """Picks the first request to each path ending in one of `suffixes`, then no other."""

    def __init__(self, *suffixes: str) -> None:
        self._suffixes = suffixes
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str) -> bool:
        bare = path.split("?", maxsplit=1)[0]
        suffix = next((s for s in self._suffixes if bare.endswith(s)), None)
        if method != "POST" or suffix is None:
            return False
        with self._lock:
            first = suffix not in self._seen
            self._seen.add(suffix)
            return first


class _Late:
    def __init__(self, sidecar: SidecarProcess, direct: MlflowClient, metrics_port: int) -> None:
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.container = ClientContainer()
        self.container.config.from_dict({"target": sidecar.target, "timeout_s": 60.0})
        self.sidecar = sidecar
        self.direct = direct

    @property
    def tracking(self) -> ExperimentTracking:
        return self.container.experiment_tracking()  # type: ignore[no-any-return]

    @property
    def registry(self) -> ModelRegistry:
        return self.container.model_registry()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def late(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Late]:
    held = _FirstOf("/runs/create", "/model-versions/create")
    with DelayProxy(
        mlflow_server.url, delay_s=0.0, delayed=lambda _m, _p: False, held=held, hold_s=5.0
    ) as proxy:
        metrics_port = free_port()
        sidecar = SidecarProcess(
            tmp_path_factory.mktemp("late-sidecar"),
            proxy.url,
            MLFLOW_SIDECAR__METRICS__PORT=str(metrics_port),
            MLFLOW_SIDECAR__MLFLOW__REQUEST_TIMEOUT_S="2",
            # Other requests are not held: tries enough for a loaded machine's slow ones.
            MLFLOW_SIDECAR__RETRY__MAX_TRIES="20",
            MLFLOW_SIDECAR__RETRY__FACTOR_S="0.05",
            MLFLOW_SIDECAR__RETRY__MAX_BACKOFF_S="0.2",
        )
        sidecar.start()
        world = _Late(sidecar, MlflowClient(mlflow_server.url, mlflow_server.url), metrics_port)
        try:
            yield world
        finally:
            world.container.shutdown_resources()
            sidecar.stop()


def _removed(late: _Late, kind: str) -> float:
    with urllib.request.urlopen(late.metrics_url, timeout=10) as answer:
        scraped = answer.read().decode()
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            if sample.name == "mlflow_sidecar_late_creates_removed_total" and sample.labels == {
                "kind": kind
            }:
                return float(sample.value)
    return 0.0


def _runs_of_request(
    direct: MlflowClient, experiment_id: str, request_id: str, view: int
) -> list[str]:
    found = direct.search_runs(
        [experiment_id],
        filter_string=f"tags.`{REQUEST_ID_TAG}` = '{request_id}'",
        run_view_type=view,
    )
    return sorted(r.info.run_id for r in found)


def _eventually(check: Callable[[], bool], what: str, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def test_a_run_made_by_a_late_try_is_removed_again(late: _Late, unique: str) -> None:
    exp = late.tracking.create_experiment(f"late-runs-{unique}")
    request_id = uuid.uuid4().hex
    run = late.tracking.start_run(exp.experiment_id, run_name="once", request_id=request_id)

    def tagged(view: int) -> list[str]:
        return _runs_of_request(late.direct, exp.experiment_id, request_id, view)

    # The held try lands: two runs of one request id, for a moment.
    _eventually(lambda: len(tagged(ViewType.ALL)) == 2, "the held create never landed")
    _eventually(
        lambda: tagged(ViewType.ACTIVE_ONLY) == [run.run_id],
        "the late run was not removed",
    )
    (removed,) = set(tagged(ViewType.ALL)) - {run.run_id}
    _eventually(lambda: _removed(late, "run") == 1, "the removal was not counted")
    assert late.direct.get_run(removed).data.tags[DUPLICATE_OF_TAG] == run.run_id
    assert late.tracking.get_run(run.run_id).info.lifecycle_stage.name == "ACTIVE"
    # The repeat answers with the same run.
    again = late.tracking.start_run(exp.experiment_id, run_name="once", request_id=request_id)
    assert again.run_id == run.run_id


def test_a_version_made_by_a_late_try_is_removed_again(
    late: _Late, unique: str, tmp_path: Path
) -> None:
    name = f"late-mv-{unique}"
    exp = late.tracking.create_experiment(f"late-mv-{unique}")
    run = late.tracking.start_run(exp.experiment_id)
    (tmp_path / "model.bin").write_bytes(b"weights")
    late.tracking.upload_artifact(run.run_id, tmp_path / "model.bin", "model/model.bin")
    late.registry.create_registered_model(name)
    request_id = uuid.uuid4().hex
    version = late.registry.create_model_version(
        name, run_id=run.run_id, artifact_path="model", request_id=request_id
    )

    def versions() -> list[int]:
        found = late.direct.search_model_versions(f"name = '{name}'")
        return sorted(int(v.version) for v in found)

    _eventually(lambda: len(versions()) == 2, "the held create never landed")
    _eventually(lambda: versions() == [version.version], "the late version was not removed")
    # Counted once the check that deleted it returns, a moment after the delete.
    _eventually(lambda: _removed(late, "model_version") == 1, "the removal was not counted")
    again = late.registry.create_model_version(
        name, run_id=run.run_id, artifact_path="model", request_id=request_id
    )
    assert again.version == version.version


def test_a_lookup_by_request_id_passes_over_a_removed_second_run(
    mlflow_server: MlflowServer, client_container: ClientContainer, unique: str
) -> None:
    # The removed run started first (two runs of one start time are told apart by id):
    # a sidecar whose ledger does not know the id still answers with the kept run.
    direct = MlflowClient(mlflow_server.url, mlflow_server.url)
    tracking = client_container.experiment_tracking()
    exp = tracking.create_experiment(f"late-lookup-{unique}")
    request_id = uuid.uuid4().hex
    removed = direct.create_run(
        exp.experiment_id,
        start_time=1_000,
        tags={REQUEST_ID_TAG: request_id, DUPLICATE_OF_TAG: "kept"},
    )
    direct.delete_run(removed.info.run_id)
    kept = direct.create_run(exp.experiment_id, start_time=2_000, tags={REQUEST_ID_TAG: request_id})
    run = tracking.start_run(exp.experiment_id, request_id=request_id)
    assert run.run_id == kept.info.run_id


def test_a_late_run_is_removed_by_the_sidecar_restarted_after_the_call(
    mlflow_server: MlflowServer, tmp_path: Path, unique: str
) -> None:
    # The sidecar is killed after it answered and before the held try lands: the checks
    # it had not made yet are in its data dir, and the restarted sidecar makes them.
    direct = MlflowClient(mlflow_server.url, mlflow_server.url)
    held = _FirstOf("/runs/create")
    with DelayProxy(
        mlflow_server.url, delay_s=0.0, delayed=lambda _m, _p: False, held=held, hold_s=8.0
    ) as proxy:
        sidecar = SidecarProcess(
            tmp_path / "sidecar",
            proxy.url,
            MLFLOW_SIDECAR__MLFLOW__REQUEST_TIMEOUT_S="2",
            MLFLOW_SIDECAR__RETRY__MAX_TRIES="20",
            MLFLOW_SIDECAR__RETRY__FACTOR_S="0.05",
            MLFLOW_SIDECAR__RETRY__MAX_BACKOFF_S="0.2",
        )
        sidecar.start()
        container = ClientContainer()
        container.config.from_dict({"target": sidecar.target, "timeout_s": 60.0})
        try:
            tracking = container.experiment_tracking()
            exp = tracking.create_experiment(f"late-restart-{unique}")
            request_id = uuid.uuid4().hex
            run = tracking.start_run(exp.experiment_id, request_id=request_id)
            sidecar.kill()
            sidecar.start()

            def tagged(view: int) -> list[str]:
                return _runs_of_request(direct, exp.experiment_id, request_id, view)

            _eventually(lambda: len(tagged(ViewType.ALL)) == 2, "the held create never landed")
            _eventually(
                lambda: tagged(ViewType.ACTIVE_ONLY) == [run.run_id],
                "the late run was not removed after the restart",
                timeout_s=60.0,
            )
        finally:
            container.shutdown_resources()
            sidecar.stop()
    (removed,) = set(tagged(ViewType.ALL)) - {run.run_id}
    assert direct.get_run(removed).data.tags[DUPLICATE_OF_TAG] == run.run_id
    assert "taken up" in sidecar.log_tail(200)
