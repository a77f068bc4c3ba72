"""Concurrent registrations of one model through one sidecar."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from mlflow_sidecar.v1 import registry_pb2 as pb

CALLS = 16


def test_concurrent_create_model_version_yields_versions_one_to_sixteen(
    registry_stub, run_id, unique
):
    name = f"concurrent-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))

    def register(index: int) -> pb.ModelVersion:
        request = pb.CreateModelVersionRequest(
            name=name, source=f"runs:/{run_id}/agent-{index}", tags={"index": str(index)}
        )
        return registry_stub.CreateModelVersion(request, timeout=120).model_version

    with ThreadPoolExecutor(max_workers=CALLS) as pool:
        versions = list(pool.map(register, range(CALLS)))

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
