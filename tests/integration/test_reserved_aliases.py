"""The alias names SetModelAlias refuses ('latest', 'v<number>', in any case) are refused
the same way by every RPC that takes an alias: INVALID_ARGUMENT on `alias` (on `aliases[i]`
for WatchModelAlias)."""

from __future__ import annotations

import grpc
import pytest

from mlflow_sidecar.v1 import registry_pb2 as pb

RESERVED = ["latest", "Latest", "LATEST", "v1", "V1", "v007"]


def _refused(call, field: str = "alias") -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}: "), err.value.details()
    assert "reserved" in err.value.details()


@pytest.mark.parametrize("alias", RESERVED)
def test_reserved_aliases_are_refused_by_every_alias_rpc(registry_stub, run_id, unique, alias):
    name = f"reserved-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name))
    registry_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(name=name, source=f"runs:/{run_id}/model")
    )
    _refused(
        lambda: registry_stub.SetModelAlias(
            pb.SetModelAliasRequest(name=name, alias=alias, version=1)
        )
    )
    _refused(
        lambda: registry_stub.GetModelVersionByAlias(
            pb.GetModelVersionByAliasRequest(name=name, alias=alias)
        )
    )
    _refused(
        lambda: list(registry_stub.DownloadModel(pb.DownloadModelRequest(name=name, alias=alias)))
    )
    _refused(
        lambda: registry_stub.DeleteModelAlias(pb.DeleteModelAliasRequest(name=name, alias=alias))
    )
    _refused(
        lambda: next(
            registry_stub.WatchModelAlias(
                pb.WatchModelAliasRequest(name=name, aliases=["champion", alias])
            )
        ),
        "aliases[1]",
    )
    # An ordinary alias still resolves, and the version is still reachable by number.
    registry_stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="champion", version=1))
    found = registry_stub.GetModelVersionByAlias(
        pb.GetModelVersionByAliasRequest(name=name, alias="champion")
    )
    assert found.model_version.version == 1
