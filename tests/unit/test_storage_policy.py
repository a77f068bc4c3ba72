"""The storage policy: which artifact locations the sidecar may touch."""

from __future__ import annotations

import pytest

from mlflow_sidecar.core.errors import InvalidArgumentError, PermissionDeniedError
from mlflow_sidecar.server.mlflow_gateway.storage_policy import StoragePolicy, check_uri_syntax


def _policy(tmp_path, uris=(), root=None):
    return StoragePolicy(
        allowed_roots=[tmp_path / "root"],
        allowed_uris=list(uris),
        tracking_uri="http://mlflow:5000",
        discover_root=lambda: root,
    )


def test_local_paths_only_under_the_roots_symlinks_resolved(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "escape").symlink_to("/etc")
    policy = _policy(tmp_path)
    assert policy.allows(f"file://{tmp_path}/root/1/a")
    assert policy.allows(f"{tmp_path}/root/1/a")
    assert not policy.allows(f"{tmp_path}/rootx/a")
    assert not policy.allows(f"file://{tmp_path}/root/escape/passwd")
    assert not policy.allows("relative/path")
    with pytest.raises(PermissionDeniedError) as err:
        policy.check("source", "file:///etc")
    assert err.value.reason == "PATH_OUTSIDE_ROOTS" and "/etc" not in err.value.message


def test_remote_stores_only_the_servers_and_the_configured(tmp_path):
    policy = _policy(tmp_path, uris=["s3://bucket/allowed"], root="s3://store/root")
    assert policy.allows("mlflow-artifacts:/1/abc/artifacts")
    assert policy.allows("http://mlflow:5000/api/2.0/mlflow-artifacts/artifacts/1")
    assert not policy.allows("http://mlflow:5000/api/2.0/mlflow/runs/get")
    assert not policy.allows("http://elsewhere/api/2.0/mlflow-artifacts/artifacts/1")
    assert policy.allows("s3://bucket/allowed/1/x")
    assert not policy.allows("s3://bucket/allowedx/1")
    assert policy.allows("s3://store/root/1/x")
    assert not policy.allows("gs://other/x")


@pytest.mark.parametrize(
    "uri", ["runs:/r/../x", "models:/m/%2E%2e", "file:///a%2fb", "a\\b", "file:///a\x00"]
)
def test_tricks_are_invalid(uri):
    with pytest.raises(InvalidArgumentError) as err:
        check_uri_syntax("source", uri)
    assert err.value.reason == "UNSAFE_URI" and err.value.message.startswith("source:")
