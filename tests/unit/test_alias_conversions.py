"""Alias changes and watch statuses cross the wire unchanged, both ways."""

from __future__ import annotations

import pytest

from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import AliasChange, AliasChangeKind, ModelVersion, WatchStatus
from mlflow_sidecar.v1 import registry_pb2 as pb


@pytest.mark.parametrize("kind", list(AliasChangeKind))
def test_every_kind_of_change_round_trips(kind):
    version = ModelVersion("agent", 7, source="runs:/r/model", tags={"k": "v"})
    change = AliasChange("champion", kind, version, 6)
    assert conv.alias_change_from_pb(conv.alias_change_to_pb(change)) == change
    assert change.version == 7


def test_an_alias_that_is_not_set_has_no_version():
    change = AliasChange("champion", AliasChangeKind.DELETED, None, 3)
    message = conv.alias_change_to_pb(change)
    assert not message.HasField("model_version")
    assert conv.alias_change_from_pb(message) == change
    assert change.version == 0


def test_a_kind_this_client_does_not_know_is_none():
    assert conv.alias_change_from_pb(pb.AliasChange(alias="a")) is None  # UNSPECIFIED
    assert conv.alias_change_from_pb(pb.AliasChange(alias="a", kind=42)) is None  # type: ignore[arg-type]


def test_a_watch_status_round_trips():
    status = WatchStatus(False, 1_700_000_000_000, "MLflow is unavailable")
    assert conv.watch_status_from_pb(conv.watch_status_to_pb(status)) == status
