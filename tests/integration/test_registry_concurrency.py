"""Concurrent registrations of one model through one sidecar."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2, tracking_pb2_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config

CALLS = 16


def _register_concurrently(registry_stub, name: str, run_id: str) -> list[pb.ModelVersion]:
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))

    def register(index: int) -> pb.ModelVersion:
        request = pb.CreateModelVersionRequest(
            name=name, source=f"runs:/{run_id}/agent-{index}", tags={"index": str(index)}
        )
        return registry_stub.CreateModelVersion(request, timeout=120).model_version

    with ThreadPoolExecutor(max_workers=CALLS) as pool:
        return list(pool.map(register, range(CALLS)))


def _assert_versions_one_to_sixteen(registry_stub, name, run_id, versions) -> None:
    assert sorted(v.version for v in versions) == list(range(1, CALLS + 1))
    assert all(v.status == pb.MODEL_VERSION_STATUS_READY for v in versions)
    # Each caller got the version made from its own request.
    assert all(v.source == f"runs:/{run_id}/agent-{v.tags['index']}" for v in versions)
    stored = registry_stub.SearchModelVersions(
        pb.SearchModelVersionsRequest(filter=f"name = '{name}'", page_size=100)
    ).model_versions
    assert sorted(v.version for v in stored) == list(range(1, CALLS + 1))
    assert {v.version: v.source for v in stored} == {v.version: v.source for v in versions}
    latest = registry_stub.GetLatestModelVersion(pb.GetLatestModelVersionRequest(name=name))
    assert latest.model_version.version == CALLS


def test_concurrent_create_model_version_yields_versions_one_to_sixteen(
    registry_stub, run_id, unique
):
    name = f"concurrent-{unique}"
    versions = _register_concurrently(registry_stub, name, run_id)
    _assert_versions_one_to_sixteen(registry_stub, name, run_id, versions)


@pytest.fixture()
def embedded_sidecar(tmp_path):
    """A sidecar on its default embedded store (SQLite in-process), not a tracking server."""
    running = RunningSidecar(sidecar_config(tmp_path, ""))
    yield running
    running.stop()


def test_concurrent_create_model_version_on_the_embedded_store(embedded_sidecar, unique):
    with grpc.insecure_channel(embedded_sidecar.target) as channel:
        registry_stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
        tracking_stub = tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)
        experiment_id = tracking_stub.CreateExperiment(
            tracking_pb2.CreateExperimentRequest(name=f"embedded-{unique}")
        ).experiment.experiment_id
        run_id = tracking_stub.StartRun(
            tracking_pb2.StartRunRequest(experiment_id=experiment_id)
        ).run.info.run_id
        name = f"embedded-{unique}"
        versions = _register_concurrently(registry_stub, name, run_id)
        _assert_versions_one_to_sixteen(registry_stub, name, run_id, versions)
